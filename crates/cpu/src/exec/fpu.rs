//! The x87 FPU: every x87 instruction on 80-bit extended precision, plus
//! the SSE state instructions (FXSAVE/FXRSTOR), with #NM from CR0.TS/EM/MP
//! and #MF for unmasked exceptions (CR0.NE = 1).
//!
//! The arithmetic lives in `fpu/soft.rs` (software 80-bit floating point
//! with x87 rounding, precision control and exception rules). This file
//! handles the register stack (TOP, tag word, stack overflow/underflow and
//! their masked responses), the condition codes, the exception flags and
//! their delivery, the last-instruction/data pointers and the memory forms.
//!
//! The transcendental instructions (F2XM1, FYL2X, FYL2XP1, FPTAN, FPATAN,
//! FSIN, FCOS, FSINCOS) live in `fpu/trans.rs`: double-double evaluation
//! rounded once, within an ulp of the hardware's results (which are not
//! correctly rounded either), with the hardware's 66-bit π/2 for the
//! argument reduction.
//!
//! `tests/x87.rs` checks all of this against the host's own x87.

mod soft;
mod trans;

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
    let oc = insn.op_code();
    oc.encoding() == iced_x86::EncodingKind::Legacy
        && oc.table() == iced_x86::OpCodeTableKind::Normal
        && (0xd8..=0xdf).contains(&oc.op_code())
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

fn x87_unimplemented(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    Err(Exc::ud())
}

/// The WAIT-prefixed forms (FINIT, FSTSW, FSTCW, FCLEX, FSAVE, FSTENV) when
/// the decoder joins them: the WAIT part first, then the no-wait part.
fn waiting_control(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use Mnemonic::*;
    fwait(c, d, bus)?;
    match d.insn.mnemonic() {
        Finit => fninit(c, d, bus),
        Fstsw => fnstsw(c, d, bus),
        Fstcw => fnstcw(c, d, bus),
        Fclex => fnclex(c, d, bus),
        Fsave => fnsave(c, d, bus),
        _ => fnstenv(c, d, bus),
    }
}

fn fnop(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)
}

fn fninit(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let f = &mut c.st.fpu;
    f.fcw = 0x37f;
    f.fsw = 0;
    f.ftw = 0xffff;
    f.fip = 0;
    f.fcs = 0;
    f.fdp = 0;
    f.fds = 0;
    f.fop = 0;
    Ok(())
}

fn fnstsw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let v = c.st.fpu.fsw as u64;
    if d.ops[0].kind == OpK::Mem {
        let ea = c.ea(d);
        c.write_mem(bus, d.mseg as usize, ea, 2, v)
    } else {
        c.sr(0, 2, v);
        Ok(())
    }
}

fn fnstcw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let ea = c.ea(d);
    c.write_mem(bus, d.mseg as usize, ea, 2, c.st.fpu.fcw as u64)
}

fn fldcw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let ea = c.ea(d);
    mf_check(c)?;
    let v = c.read_mem(bus, d.mseg as usize, ea, 2)? as u16;
    c.st.fpu.fcw = (v & 0x1f3f) | 0x40;
    update_es(&mut c.st.fpu);
    Ok(())
}

fn fnclex(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    c.st.fpu.fsw &= 0x7f00;
    Ok(())
}

fn fwait(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    if c.st.cr0 & (cr::CR0_MP | cr::CR0_TS) == (cr::CR0_MP | cr::CR0_TS) {
        return Err(Exc::fault(Vector::NM));
    }
    mf_check(c)
}

/// Writes the FNSTENV image (28 bytes in 32-bit form, 14 in 16-bit form).
fn store_env(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32, o32: bool) -> Res<u32> {
    let f = c.st.fpu;
    let vals: [u32; 7] = [
        f.fcw as u32 | 0xffff_0000,
        f.fsw as u32 | 0xffff_0000,
        full_tags(&f) as u32 | 0xffff_0000,
        f.fip,
        f.fcs as u32 | ((f.fop as u32 & 0x7ff) << 16),
        f.fdp,
        f.fds as u32 | 0xffff_0000,
    ];
    let w = if o32 { 4 } else { 2 };
    for (i, v) in vals.iter().enumerate() {
        c.write_mem(bus, s, ea.wrapping_add(i as u32 * w), w as u8, *v as u64)?;
    }
    Ok(7 * w)
}

fn load_env(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32, o32: bool) -> Res<u32> {
    let w = if o32 { 4 } else { 2 };
    let mut v = [0u32; 7];
    for (i, x) in v.iter_mut().enumerate() {
        *x = c.read_mem(bus, s, ea.wrapping_add(i as u32 * w), w as u8)? as u32;
    }
    let f = &mut c.st.fpu;
    f.fcw = (v[0] as u16 & 0x1f3f) | 0x40;
    f.fsw = v[1] as u16;
    f.ftw = v[2] as u16;
    f.fip = v[3];
    f.fcs = v[4] as u16;
    f.fop = ((v[4] >> 16) & 0x7ff) as u16;
    f.fdp = v[5];
    f.fds = v[6] as u16;
    Ok(7 * w)
}

fn fnstenv(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let ea = c.ea(d);
    store_env(
        c,
        bus,
        d.mseg as usize,
        ea,
        d.insn.code_size() != iced_x86::CodeSize::Code16 || d.osize == 4,
    )?;
    c.st.fpu.fcw |= 0x3f;
    Ok(())
}

fn fldenv(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    mf_check(c)?;
    let ea = c.ea(d);
    load_env(c, bus, d.mseg as usize, ea, env32(d))?;
    update_es(&mut c.st.fpu);
    Ok(())
}

fn env32(d: &DecodedInsn) -> bool {
    let size = d.insn.memory_size().size();
    !matches!(size, 14 | 94)
}

fn top(f: &FpuState) -> usize {
    ((f.fsw >> 11) & 7) as usize
}

fn write_f80(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32, v: F80) -> R {
    c.write_mem(bus, s, ea, 8, v.mantissa)?;
    c.write_mem(bus, s, ea.wrapping_add(8), 2, v.sign_exp as u64)
}

fn read_f80(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32) -> Res<F80> {
    Ok(F80 {
        mantissa: c.read_mem(bus, s, ea, 8)?,
        sign_exp: c.read_mem(bus, s, ea.wrapping_add(8), 2)? as u16,
    })
}

fn fnsave(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let s = d.mseg as usize;
    let ea = c.ea(d);
    let o32 = env32(d);
    let n = store_env(c, bus, s, ea, o32)?;
    let t = top(&c.st.fpu);
    for i in 0..8 {
        let r = c.st.fpu.regs[(t + i) & 7];
        write_f80(c, bus, s, ea.wrapping_add(n + 10 * i as u32), r)?;
    }
    fninit(c, d, bus)
}

fn frstor(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    mf_check(c)?;
    let s = d.mseg as usize;
    let ea = c.ea(d);
    let n = load_env(c, bus, s, ea, env32(d))?;
    let t = top(&c.st.fpu);
    for i in 0..8 {
        let r = read_f80(c, bus, s, ea.wrapping_add(n + 10 * i as u32))?;
        c.st.fpu.regs[(t + i) & 7] = r;
    }
    update_es(&mut c.st.fpu);
    Ok(())
}

fn fx_check(c: &Cpu, d: &DecodedInsn, ea: u32) -> R {
    if c.cpuid.query(1, 0).edx & crate::cpuid::edx1::FXSR == 0 {
        return Err(Exc::ud());
    }
    if c.st.cr0 & (cr::CR0_EM | cr::CR0_TS) != 0 {
        return Err(Exc::fault(Vector::NM));
    }
    let lin = (c.st.seg[d.mseg as usize].base as u32).wrapping_add(ea);
    if lin & 15 != 0 {
        return Err(Exc::gp(0));
    }
    Ok(())
}

fn fxsave(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let ea = c.ea(d);
    fx_check(c, d, ea)?;
    let s = d.mseg as usize;
    let f = c.st.fpu;
    let mut img = [0u8; 512];
    img[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    let mut abridged = 0u8;
    for i in 0..8 {
        if (f.ftw >> (2 * i)) & 3 != 3 {
            abridged |= 1 << i;
        }
    }
    img[4] = abridged;
    img[6..8].copy_from_slice(&f.fop.to_le_bytes());
    img[8..12].copy_from_slice(&f.fip.to_le_bytes());
    img[12..14].copy_from_slice(&f.fcs.to_le_bytes());
    img[16..20].copy_from_slice(&f.fdp.to_le_bytes());
    img[20..22].copy_from_slice(&f.fds.to_le_bytes());
    img[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    let t = top(&f);
    for i in 0..8 {
        let r = f.regs[(t + i) & 7];
        let o = 32 + 16 * i;
        img[o..o + 8].copy_from_slice(&r.mantissa.to_le_bytes());
        img[o + 8..o + 10].copy_from_slice(&r.sign_exp.to_le_bytes());
    }
    for i in 0..8 {
        let o = 160 + 16 * i;
        img[o..o + 16].copy_from_slice(&f.xmm[i].to_le_bytes());
    }
    // Check the whole area is writable before storing any of it.
    c.seg_lin(s, ea, 1, true)?;
    c.seg_lin(s, ea.wrapping_add(511), 1, true)?;
    for (i, ch) in img.chunks(8).enumerate() {
        let v = u64::from_le_bytes(ch.try_into().unwrap_or([0; 8]));
        c.write_mem(bus, s, ea.wrapping_add(8 * i as u32), 8, v)?;
    }
    Ok(())
}

fn fxrstor(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let ea = c.ea(d);
    fx_check(c, d, ea)?;
    let s = d.mseg as usize;
    let mut img = [0u8; 512];
    for i in 0..64 {
        let v = c.read_mem(bus, s, ea.wrapping_add(8 * i as u32), 8)?;
        img[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
    }
    let rd16 = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let rd32 = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
    let mxcsr = rd32(24);
    if mxcsr & 0xffff_0000 != 0 {
        return Err(Exc::gp(0));
    }
    let f = &mut c.st.fpu;
    f.fcw = rd16(0);
    f.fsw = rd16(2);
    let abridged = img[4];
    let mut ftw = 0u16;
    for i in 0..8 {
        // Non-empty registers get "valid" (00) here; FNSAVE/FNSTENV
        // compute the full tags from the contents.
        if abridged & (1 << i) == 0 {
            ftw |= 3 << (2 * i);
        }
    }
    f.ftw = ftw;
    f.fop = rd16(6) & 0x7ff;
    f.fip = rd32(8);
    f.fcs = rd16(12);
    f.fdp = rd32(16);
    f.fds = rd16(20);
    f.mxcsr = mxcsr;
    let t = ((f.fsw >> 11) & 7) as usize;
    for i in 0..8 {
        let o = 32 + 16 * i;
        let mut m = [0u8; 8];
        m.copy_from_slice(&img[o..o + 8]);
        f.regs[(t + i) & 7] = F80 {
            mantissa: u64::from_le_bytes(m),
            sign_exp: rd16(o + 8),
        };
    }
    for i in 0..8 {
        let o = 160 + 16 * i;
        let mut x = [0u8; 16];
        x.copy_from_slice(&img[o..o + 16]);
        f.xmm[i] = u128::from_le_bytes(x);
    }
    update_es(f);
    Ok(())
}

// ---------------------------------------------------------------------------
// The register stack.

fn set_top(f: &mut FpuState, t: usize) {
    f.fsw = (f.fsw & !0x3800) | ((t as u16 & 7) << 11);
}

fn phys(f: &FpuState, i: usize) -> usize {
    (top(f) + i) & 7
}

fn tag(f: &FpuState, p: usize) -> u16 {
    (f.ftw >> (2 * p)) & 3
}

fn set_tag(f: &mut FpuState, p: usize, t: u16) {
    f.ftw = (f.ftw & !(3 << (2 * p))) | (t << (2 * p));
}

fn is_empty(f: &FpuState, i: usize) -> bool {
    tag(f, phys(f, i)) == 3
}

fn get(f: &FpuState, i: usize) -> F80 {
    f.regs[phys(f, i)]
}

fn put(f: &mut FpuState, i: usize, v: F80) {
    let p = phys(f, i);
    f.regs[p] = v;
    set_tag(f, p, soft::tag_of(v));
}

fn push(f: &mut FpuState, v: F80) {
    let t = (top(f) + 7) & 7;
    set_top(f, t);
    put(f, 0, v);
}

fn pop(f: &mut FpuState) {
    let p = phys(f, 0);
    set_tag(f, p, 3);
    set_top(f, top(f) + 1);
}

/// The tag word with the tags of non-empty registers computed from their
/// contents, as FNSTENV/FNSAVE store it.
fn full_tags(f: &FpuState) -> u16 {
    let mut t = 0;
    for p in 0..8 {
        let v = if tag(f, p) == 3 {
            3
        } else {
            soft::tag_of(f.regs[p])
        };
        t |= v << (2 * p);
    }
    t
}

/// ST(i) as a source: on an empty register, a stack underflow (the masked
/// response reads the QNaN indefinite).
fn src(f: &FpuState, env: &mut Env, i: usize) -> F80 {
    if is_empty(f, i) {
        underflow(env);
        INDEFINITE
    } else {
        get(f, i)
    }
}

fn underflow(env: &mut Env) {
    env.flags |= IE;
    if env.stack.is_none() {
        env.stack = Some(false);
    }
}

/// Checks that a push has room: the masked response to a stack overflow
/// pushes the QNaN indefinite instead of `v`.
fn push_value(f: &FpuState, env: &mut Env, v: F80) -> F80 {
    if tag(f, (top(f) + 7) & 7) != 3 {
        env.flags |= IE;
        env.stack = Some(true);
        INDEFINITE
    } else {
        v
    }
}

/// Index of the ST(i) register operand `n`.
fn st_op(d: &DecodedInsn, n: u32) -> usize {
    (d.insn.op_register(n) as u32).wrapping_sub(Register::ST0 as u32) as usize & 7
}

/// ST(i) of one-register forms: the last operand, ST(1) without operands.
fn st_last(d: &DecodedInsn) -> usize {
    match d.insn.op_count() {
        0 => 1,
        n => st_op(d, n - 1),
    }
}

fn has_mem(d: &DecodedInsn) -> bool {
    d.ops[0].kind == OpK::Mem
}

// ---------------------------------------------------------------------------
// Instruction prologue and epilogue.

/// The opcode (FOP): the low three bits of the D8–DF byte and the ModR/M.
fn opcode(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> u16 {
    let lin0 = c.st.seg[seg::CS].base.wrapping_add(c.st.rip) as u32;
    let mut byte = |c: &mut Cpu, k: u32| -> Option<u8> {
        let p = c.translate_fetch(bus, lin0.wrapping_add(k)).ok()?;
        c.read_phys(bus, p, 1).ok().map(|v| v as u8)
    };
    for k in 0..d.len as u32 {
        match byte(c, k) {
            Some(b @ 0xd8..=0xdf) => {
                let modrm = byte(c, k + 1).unwrap_or(0);
                return (((b & 7) as u16) << 8) | modrm as u16;
            }
            Some(_) => {}
            None => break,
        }
    }
    0
}

/// Common start of the non-control x87 instructions: #NM, pending #MF, and
/// the last instruction (and data) pointers.
fn begin(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    mf_check(c)?;
    let fop = opcode(c, d, bus);
    let f = &mut c.st.fpu;
    f.fip = c.st.rip as u32;
    f.fcs = c.st.seg[seg::CS].selector;
    f.fop = fop & 0x7ff;
    if has_mem(d) {
        c.st.fpu.fdp = c.ea(d);
        c.st.fpu.fds = c.st.seg[d.mseg as usize].selector;
    }
    Ok(())
}

/// Records the exceptions of an operation in the FSW. Returns false when an
/// unmasked invalid-operation, zero-divide or denormal exception means the
/// destination must not be written (nor the stack popped).
fn finish(c: &mut Cpu, env: &Env) -> bool {
    let f = &mut c.st.fpu;
    let mut fl = env.flags & 0x3f;
    if fl & DE != 0 && env.masks & DE == 0 {
        // An unmasked denormal stops the operation before it computes.
        fl &= IE | ZE | DE;
    }
    f.fsw |= fl;
    f.fsw &= !C1;
    if env.c1 {
        f.fsw |= C1;
    }
    if let Some(over) = env.stack {
        f.fsw |= SF;
        f.fsw = (f.fsw & !C1) | if over { C1 } else { 0 };
    }
    if fl & !env.masks != 0 {
        f.fsw |= ES | BUSY;
    }
    let ok = fl & (IE | ZE | DE) & !env.masks == 0;
    if !ok && env.stack.is_none() {
        f.fsw &= !C1;
    }
    ok
}

/// Whether a memory store may happen: unmasked IE, OE and UE suppress it.
fn store_ok(env: &Env) -> bool {
    env.flags & (IE | OE | UE) & !env.masks == 0
}

fn set_cc(c: &mut Cpu, bits: u16) {
    let f = &mut c.st.fpu;
    f.fsw = (f.fsw & !(C0 | C2 | C3)) | bits;
}

/// Reads a memory operand as an 80-bit value (FLD m32/m64/m80, FILD,
/// FBLD and the memory forms of the arithmetic and compares).
fn load_mem(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, env: &mut Env) -> Res<F80> {
    let ea = c.ea(d);
    let s = d.mseg as usize;
    Ok(match d.insn.memory_size() {
        MemorySize::Float32 => soft::from_float(env, c.read_mem(bus, s, ea, 4)?, false),
        MemorySize::Float64 => soft::from_float(env, c.read_mem(bus, s, ea, 8)?, true),
        MemorySize::Float80 => read_f80(c, bus, s, ea)?,
        MemorySize::Int16 => soft::from_i64(c.read_mem(bus, s, ea, 2)? as i16 as i64),
        MemorySize::Int32 => soft::from_i64(c.read_mem(bus, s, ea, 4)? as i32 as i64),
        MemorySize::Int64 => soft::from_i64(c.read_mem(bus, s, ea, 8)? as i64),
        MemorySize::Bcd => {
            let lo = c.read_mem(bus, s, ea, 8)?;
            let hi = c.read_mem(bus, s, ea.wrapping_add(8), 2)?;
            let mut b = [0u8; 10];
            b[..8].copy_from_slice(&lo.to_le_bytes());
            b[8..].copy_from_slice(&(hi as u16).to_le_bytes());
            soft::from_bcd(b)
        }
        _ => return Err(Exc::ud()),
    })
}

/// Reads the memory operand of an arithmetic or compare instruction. A
/// float source keeps a signaling NaN signaling (the operation's NaN rules
/// apply), and its denormal-operand exception is raised by `mem_denormal`
/// only when the operation gets as far as looking at operand values.
fn load_mem_op(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, env: &mut Env) -> Res<(F80, bool)> {
    let ea = c.ea(d);
    let s = d.mseg as usize;
    Ok(match d.insn.memory_size() {
        MemorySize::Float32 => soft::from_float_raw(c.read_mem(bus, s, ea, 4)?, false),
        MemorySize::Float64 => soft::from_float_raw(c.read_mem(bus, s, ea, 8)?, true),
        _ => (load_mem(c, d, bus, env)?, false),
    })
}

/// DE for a denormal memory source, unless NaN/unsupported operands or a
/// zero divide took precedence.
fn mem_denormal(env: &mut Env, denormal: bool, other: F80) {
    if denormal
        && env.flags & ZE == 0
        && !matches!(
            soft::classify(other),
            Class::QNaN | Class::SNaN | Class::Unsupported
        )
    {
        env.flags |= DE;
    }
}

// ---------------------------------------------------------------------------
// Loads and stores.

fn fld(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let v = if has_mem(d) {
        load_mem(c, d, bus, &mut env)?
    } else {
        src(&c.st.fpu, &mut env, st_last(d))
    };
    let v = push_value(&c.st.fpu, &mut env, v);
    // An unmasked denormal operand does not stop a load.
    finish(c, &env);
    if env.flags & IE & !env.masks == 0 {
        push(&mut c.st.fpu, v);
    }
    Ok(())
}

fn fild(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    fld(c, d, bus)
}

fn fbld(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    fld(c, d, bus)
}

fn fldconst(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use Mnemonic::*;
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let rc = env.rc;
    let v = match d.insn.mnemonic() {
        Fld1 => F80 {
            mantissa: 1 << 63,
            sign_exp: 0x3fff,
        },
        Fldz => soft::zero(false),
        Fldpi => soft::constant(rc, 0x4000, 0xc90f_daa2_2168_c234, true),
        Fldl2e => soft::constant(rc, 0x3fff, 0xb8aa_3b29_5c17_f0bb, true),
        Fldl2t => soft::constant(rc, 0x4000, 0xd49a_784b_cd1b_8afe, false),
        Fldlg2 => soft::constant(rc, 0x3ffd, 0x9a20_9a84_fbcf_f798, true),
        _ => soft::constant(rc, 0x3ffe, 0xb172_17f7_d1cf_79ab, true),
    };
    let v = push_value(&c.st.fpu, &mut env, v);
    if finish(c, &env) {
        push(&mut c.st.fpu, v);
    }
    Ok(())
}

fn fst(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let popping = d.insn.mnemonic() != Mnemonic::Fst;
    let v = src(&c.st.fpu, &mut env, 0);
    if has_mem(d) {
        let ea = c.ea(d);
        let s = d.mseg as usize;
        let (bits, size) = match d.insn.memory_size() {
            MemorySize::Float32 => (soft::to_float(&mut env, v, false), 4),
            MemorySize::Float64 => (soft::to_float(&mut env, v, true), 8),
            _ => (0, 10),
        };
        let ok = store_ok(&env);
        if !ok {
            // No rounding happened for a store that does not take place.
            env.flags &= !PE;
            env.c1 = false;
        }
        if ok {
            if size == 10 {
                write_f80(c, bus, s, ea, v)?;
            } else {
                c.write_mem(bus, s, ea, size, bits)?;
            }
        }
        if finish(c, &env) && ok && popping {
            pop(&mut c.st.fpu);
        }
    } else {
        let i = st_last(d);
        if finish(c, &env) {
            put(&mut c.st.fpu, i, v);
            if popping {
                pop(&mut c.st.fpu);
            }
        }
    }
    Ok(())
}

fn fist(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let m = d.insn.mnemonic();
    // FISTTP came with SSE3: #UD on a processor that does not report it.
    if m == Mnemonic::Fisttp && c.cpuid.query(1, 0).ecx & 1 == 0 {
        return Err(Exc::ud());
    }
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let v = src(&c.st.fpu, &mut env, 0);
    let size = match d.insn.memory_size() {
        MemorySize::Int16 => 2u8,
        MemorySize::Int32 => 4,
        _ => 8,
    };
    let r = soft::to_int(&mut env, v, size as u32 * 8, m == Mnemonic::Fisttp);
    let ok = store_ok(&env);
    if ok {
        let ea = c.ea(d);
        c.write_mem(bus, d.mseg as usize, ea, size, r)?;
    }
    if finish(c, &env) && ok && m != Mnemonic::Fist {
        pop(&mut c.st.fpu);
    }
    Ok(())
}

fn fbstp(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let v = src(&c.st.fpu, &mut env, 0);
    let bytes = soft::to_bcd(&mut env, v).unwrap_or([0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff]);
    let ok = store_ok(&env);
    if ok {
        let ea = c.ea(d);
        let s = d.mseg as usize;
        let lo = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        c.write_mem(bus, s, ea, 8, lo)?;
        c.write_mem(
            bus,
            s,
            ea.wrapping_add(8),
            2,
            u16::from_le_bytes([bytes[8], bytes[9]]) as u64,
        )?;
    }
    if finish(c, &env) && ok {
        pop(&mut c.st.fpu);
    }
    Ok(())
}

fn fxch(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let i = st_last(d);
    let a = src(&c.st.fpu, &mut env, 0);
    let b = src(&c.st.fpu, &mut env, i);
    if finish(c, &env) {
        put(&mut c.st.fpu, 0, b);
        put(&mut c.st.fpu, i, a);
    }
    Ok(())
}

fn ffree(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let i = st_last(d);
    let f = &mut c.st.fpu;
    let p = phys(f, i);
    set_tag(f, p, 3);
    if d.insn.mnemonic() == Mnemonic::Ffreep {
        pop(f);
    }
    Ok(())
}

fn fincdec(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let f = &mut c.st.fpu;
    let t = if d.insn.mnemonic() == Mnemonic::Fincstp {
        top(f) + 1
    } else {
        top(f) + 7
    };
    set_top(f, t);
    f.fsw &= !C1;
    Ok(())
}

// ---------------------------------------------------------------------------
// Arithmetic.

fn farith(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use Mnemonic::*;
    begin(c, d, bus)?;
    let m = d.insn.mnemonic();
    let (op, rev) = match m {
        Fadd | Faddp | Fiadd => (0, false),
        Fsub | Fsubp | Fisub => (1, false),
        Fsubr | Fsubrp | Fisubr => (1, true),
        Fmul | Fmulp | Fimul => (2, false),
        Fdiv | Fdivp | Fidiv => (3, false),
        _ => (3, true),
    };
    let popping = matches!(m, Faddp | Fsubp | Fsubrp | Fmulp | Fdivp | Fdivrp);
    let mut env = Env::new(c.st.fpu.fcw);
    let mut denormal = false;
    let (dst, s) = if has_mem(d) {
        let (v, dn) = load_mem_op(c, d, bus, &mut env)?;
        denormal = dn;
        (0, v)
    } else if d.insn.op_count() < 2 {
        (1, src(&c.st.fpu, &mut env, 0))
    } else {
        let s = src(&c.st.fpu, &mut env, st_op(d, 1));
        (st_op(d, 0), s)
    };
    let a = src(&c.st.fpu, &mut env, dst);
    let r = if env.stack.is_some() {
        INDEFINITE
    } else {
        let (x, y) = if rev { (s, a) } else { (a, s) };
        match op {
            0 => soft::add(&mut env, x, y, false),
            1 => soft::add(&mut env, x, y, true),
            2 => soft::mul(&mut env, x, y),
            _ => soft::div(&mut env, x, y),
        }
    };
    mem_denormal(&mut env, denormal, a);
    if finish(c, &env) {
        put(&mut c.st.fpu, dst, r);
        if popping {
            pop(&mut c.st.fpu);
        }
    }
    Ok(())
}

fn fsign(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let mut v = src(&c.st.fpu, &mut env, 0);
    if env.stack.is_none() {
        if d.insn.mnemonic() == Mnemonic::Fchs {
            v.sign_exp ^= 0x8000;
        } else {
            v.sign_exp &= 0x7fff;
        }
    }
    if finish(c, &env) {
        put(&mut c.st.fpu, 0, v);
    }
    Ok(())
}

fn funary(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let sqrt = d.insn.mnemonic() == Mnemonic::Fsqrt;
    let mut env = if sqrt {
        Env::new(c.st.fpu.fcw)
    } else {
        Env::full(c.st.fpu.fcw)
    };
    let v = src(&c.st.fpu, &mut env, 0);
    let r = if env.stack.is_some() {
        INDEFINITE
    } else if sqrt {
        soft::sqrt(&mut env, v)
    } else {
        soft::round_int(&mut env, v)
    };
    if finish(c, &env) {
        put(&mut c.st.fpu, 0, r);
    }
    Ok(())
}

fn fscale(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let a = src(&c.st.fpu, &mut env, 0);
    let b = src(&c.st.fpu, &mut env, 1);
    let r = if env.stack.is_some() {
        INDEFINITE
    } else {
        soft::scale(&mut env, a, b, c.vendor() == crate::vendor::Vendor::Intel)
    };
    if finish(c, &env) {
        put(&mut c.st.fpu, 0, r);
    }
    Ok(())
}

fn fxtract(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let a = src(&c.st.fpu, &mut env, 0);
    let (e, s) = if env.stack.is_some() {
        (INDEFINITE, INDEFINITE)
    } else {
        soft::extract(&mut env, a)
    };
    let s = push_value(&c.st.fpu, &mut env, s);
    if finish(c, &env) {
        put(&mut c.st.fpu, 0, e);
        push(&mut c.st.fpu, s);
    }
    Ok(())
}

fn fprem(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let a = src(&c.st.fpu, &mut env, 0);
    let b = src(&c.st.fpu, &mut env, 1);
    let (r, q, done) = if env.stack.is_some() {
        (INDEFINITE, 0, true)
    } else {
        soft::prem(&mut env, a, b, d.insn.mnemonic() == Mnemonic::Fprem1)
    };
    env.c1 = q & 1 != 0;
    if finish(c, &env) {
        put(&mut c.st.fpu, 0, r);
        let mut cc = 0;
        if q & 4 != 0 {
            cc |= C0;
        }
        if q & 2 != 0 {
            cc |= C3;
        }
        if !done {
            cc |= C2;
        }
        set_cc(c, cc);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Comparisons.

fn cmp_cc(r: soft::Cmp) -> u16 {
    match r {
        soft::Cmp::Greater => 0,
        soft::Cmp::Less => C0,
        soft::Cmp::Equal => C3,
        soft::Cmp::Unordered => C3 | C2 | C0,
    }
}

fn fcom(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use Mnemonic::*;
    begin(c, d, bus)?;
    let m = d.insn.mnemonic();
    let quiet = matches!(m, Fucom | Fucomp | Fucompp);
    let pops = match m {
        Fcomp | Fucomp | Ficomp => 1,
        Fcompp | Fucompp => 2,
        _ => 0,
    };
    let mut env = Env::full(c.st.fpu.fcw);
    let mut denormal = false;
    let b = if has_mem(d) {
        let (v, dn) = load_mem_op(c, d, bus, &mut env)?;
        denormal = dn;
        v
    } else if matches!(m, Fcompp | Fucompp) {
        src(&c.st.fpu, &mut env, 1)
    } else {
        src(&c.st.fpu, &mut env, st_last(d))
    };
    let a = src(&c.st.fpu, &mut env, 0);
    let r = if env.stack.is_some() {
        soft::Cmp::Unordered
    } else {
        soft::compare(&mut env, a, b, quiet)
    };
    mem_denormal(&mut env, denormal, a);
    // The condition codes are set even when an unmasked exception
    // suppresses the pops.
    let ok = finish(c, &env);
    set_cc(c, cmp_cc(r));
    if ok {
        for _ in 0..pops {
            pop(&mut c.st.fpu);
        }
    }
    Ok(())
}

fn ftst(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let a = src(&c.st.fpu, &mut env, 0);
    let r = if env.stack.is_some() {
        soft::Cmp::Unordered
    } else {
        soft::compare(&mut env, a, soft::zero(false), false)
    };
    if finish(c, &env) {
        set_cc(c, cmp_cc(r));
    }
    Ok(())
}

fn fxam(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let f = &c.st.fpu;
    let v = get(f, 0);
    let cc = if is_empty(f, 0) {
        C3 | C0
    } else {
        match soft::classify(v) {
            Class::Unsupported => 0,
            Class::QNaN | Class::SNaN => C0,
            Class::Normal => C2,
            Class::Inf => C2 | C0,
            Class::Zero => C3,
            Class::Denormal => C3 | C2,
        }
    };
    set_cc(c, cc);
    let f = &mut c.st.fpu;
    f.fsw = (f.fsw & !C1) | if soft::sign(v) { C1 } else { 0 };
    Ok(())
}

fn fcomi(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use crate::state::flags::{CF, PF, ZF};
    use Mnemonic::*;
    begin(c, d, bus)?;
    let m = d.insn.mnemonic();
    let mut env = Env::full(c.st.fpu.fcw);
    let b = src(&c.st.fpu, &mut env, st_last(d));
    let a = src(&c.st.fpu, &mut env, 0);
    let r = if env.stack.is_some() {
        soft::Cmp::Unordered
    } else {
        soft::compare(&mut env, a, b, matches!(m, Fucomi | Fucomip))
    };
    if finish(c, &env) {
        let fl = match r {
            soft::Cmp::Greater => 0,
            soft::Cmp::Less => CF,
            soft::Cmp::Equal => ZF,
            soft::Cmp::Unordered => ZF | PF | CF,
        };
        c.set_arith_flags(fl);
        if matches!(m, Fcomip | Fucomip) {
            pop(&mut c.st.fpu);
        }
    }
    Ok(())
}

fn fcmov(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let cond = match d.insn.mnemonic() {
        Mnemonic::Fcmovb => ConditionCode::b,
        Mnemonic::Fcmove => ConditionCode::e,
        Mnemonic::Fcmovbe => ConditionCode::be,
        Mnemonic::Fcmovu => ConditionCode::p,
        Mnemonic::Fcmovnb => ConditionCode::ae,
        Mnemonic::Fcmovne => ConditionCode::ne,
        Mnemonic::Fcmovnbe => ConditionCode::a,
        _ => ConditionCode::np,
    };
    let take = c.cond(cond);
    let mut env = Env::full(c.st.fpu.fcw);
    let i = st_last(d);
    let b = src(&c.st.fpu, &mut env, i);
    let a = src(&c.st.fpu, &mut env, 0);
    if finish(c, &env) {
        put(
            &mut c.st.fpu,
            0,
            if take || env.stack.is_some() { b } else { a },
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Transcendental functions (f64 approximations).

/// Screens one operand of a transcendental: NaNs, unsupported values.
fn trans_screen(env: &mut Env, v: F80) -> Result<Class, F80> {
    let cl = soft::classify(v);
    match cl {
        Class::Unsupported => {
            env.flags |= IE;
            Err(INDEFINITE)
        }
        Class::SNaN => {
            env.flags |= IE;
            Err(F80 {
                mantissa: v.mantissa | (1 << 62),
                ..v
            })
        }
        Class::QNaN => Err(v),
        Class::Denormal => {
            env.flags |= DE;
            Ok(cl)
        }
        _ => Ok(cl),
    }
}

fn nan_of_two(env: &mut Env, a: F80, b: F80) -> Option<F80> {
    let (ca, cb) = (soft::classify(a), soft::classify(b));
    let special = |c: Class| matches!(c, Class::QNaN | Class::SNaN | Class::Unsupported);
    if !special(ca) && !special(cb) {
        return None;
    }
    // Reuse the arithmetic's NaN rules.
    Some(soft::add(env, a, b, false))
}

fn ftrans(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use Mnemonic::*;
    begin(c, d, bus)?;
    let m = d.insn.mnemonic();
    let mut env = Env::full(c.st.fpu.fcw);
    let x = src(&c.st.fpu, &mut env, 0);
    match m {
        Fsin | Fcos | Fptan | Fsincos | F2xm1 => {
            // One operand in ST0; FPTAN and FSINCOS push a second result.
            let pushes = matches!(m, Fptan | Fsincos);
            let mut out = (x, None);
            let mut reduced = true;
            if env.stack.is_some() {
                out = (INDEFINITE, pushes.then_some(INDEFINITE));
            } else {
                match trans_screen(&mut env, x) {
                    Err(n) => out = (n, pushes.then_some(n)),
                    Ok(cl) => {
                        if m != F2xm1 && cl == Class::Inf {
                            env.flags |= IE;
                            out = (INDEFINITE, pushes.then_some(INDEFINITE));
                        } else if m != F2xm1 && x.sign_exp & 0x7fff >= 0x403e {
                            // |x| ≥ 2^63: out of range, C2 = 1, no change.
                            reduced = false;
                        } else if cl == Class::Zero {
                            out = match m {
                                Fsin | F2xm1 => (x, None),
                                Fcos => (soft::from_f64(1.0), None),
                                Fptan => (x, Some(soft::from_f64(1.0))),
                                _ => (soft::from_f64(1.0), Some(x)),
                            };
                            if m == Fsincos {
                                // ST0 = cos after the push, ST1 = sin.
                                out = (x, Some(soft::from_f64(1.0)));
                            }
                        } else if m == F2xm1 {
                            out = if cl == Class::Inf {
                                if soft::sign(x) {
                                    (soft::from_f64(-1.0), None)
                                } else {
                                    (x, None)
                                }
                            } else {
                                (trans::exp2m1(&mut env, x), None)
                            };
                        } else {
                            let (s, c) = trans::sin_cos(x);
                            out = match m {
                                Fsin => (trans::to_f80(&mut env, s), None),
                                Fcos => (trans::to_f80(&mut env, c), None),
                                Fptan => (
                                    trans::to_f80(&mut env, trans::tan(s, c)),
                                    Some(soft::from_f64(1.0)),
                                ),
                                _ => {
                                    let sv = trans::to_f80(&mut env, s);
                                    (sv, Some(trans::to_f80(&mut env, c)))
                                }
                            };
                        }
                    }
                }
            }
            let second = out.1.map(|v| push_value(&c.st.fpu, &mut env, v));
            if finish(c, &env) {
                if !reduced {
                    set_cc(c, C2);
                    return Ok(());
                }
                put(&mut c.st.fpu, 0, out.0);
                if let Some(v) = second {
                    push(&mut c.st.fpu, v);
                }
                let f = &mut c.st.fpu;
                f.fsw &= !C2;
            }
        }
        _ => {
            // Two operands: ST1 op ST0 → ST1, then pop.
            let y = src(&c.st.fpu, &mut env, 1);
            let r = if env.stack.is_some() {
                INDEFINITE
            } else if let Some(n) = nan_of_two(&mut env, y, x) {
                n
            } else {
                let r = two_operand(&mut env, m, x, y);
                let denormal =
                    soft::classify(x) == Class::Denormal || soft::classify(y) == Class::Denormal;
                if denormal && env.flags & (IE | ZE) == 0 {
                    env.flags |= DE;
                }
                r
            };
            if finish(c, &env) {
                put(&mut c.st.fpu, 1, r);
                pop(&mut c.st.fpu);
            }
        }
    }
    Ok(())
}

/// FYL2X, FYL2XP1 and FPATAN on non-NaN operands x = ST0, y = ST1.
fn two_operand(env: &mut Env, m: Mnemonic, x: F80, y: F80) -> F80 {
    let (cx, cy) = (soft::classify(x), soft::classify(y));
    let (sx, sy) = (soft::sign(x), soft::sign(y));
    let finite = |c: Class| matches!(c, Class::Normal | Class::Denormal);
    match m {
        Mnemonic::Fyl2x => {
            if sx && cx != Class::Zero {
                env.flags |= IE;
                return INDEFINITE;
            }
            if cx == Class::Zero {
                if cy == Class::Zero {
                    env.flags |= IE;
                    return INDEFINITE;
                }
                if cy != Class::Inf {
                    env.flags |= ZE;
                }
                return soft::inf(!sy);
            }
            if cx == Class::Inf {
                if cy == Class::Zero {
                    env.flags |= IE;
                    return INDEFINITE;
                }
                return soft::inf(sy);
            }
            // log2 x is negative below 1, zero at 1.
            let one = x.sign_exp == 0x3fff && x.mantissa == 1 << 63;
            let below = x.sign_exp < 0x3fff;
            if cy == Class::Inf {
                if one {
                    env.flags |= IE;
                    return INDEFINITE;
                }
                return soft::inf(sy != below);
            }
            if cy == Class::Zero || one {
                return soft::zero(sy != below);
            }
            trans::yl2x(env, y, x)
        }
        Mnemonic::Fyl2xp1 => {
            if cx == Class::Zero || cy == Class::Zero {
                if cx == Class::Inf || cy == Class::Inf {
                    env.flags |= IE;
                    return INDEFINITE;
                }
                return soft::zero(sx != sy);
            }
            if !finite(cx) || !finite(cy) {
                // Outside the documented domain: ∞ operands.
                if cx == Class::Inf && sx {
                    env.flags |= IE;
                    return INDEFINITE;
                }
                return soft::inf(sx != sy);
            }
            trans::yl2xp1(env, y, x)
        }
        _ => {
            if finite(cx) && finite(cy) {
                trans::atan2(env, y, x)
            } else {
                trans::atan2_special(env, y, x)
            }
        }
    }
}
