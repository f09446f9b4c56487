//! The x87 FPU against real silicon: random operands (with ±0, ±∞, NaNs,
//! denormals, pseudo-denormals, unnormals and other specials) run through
//! the host's own x87 (inline `asm!`) and through the model, in all four
//! rounding modes and the three precision-control settings; the 80-bit
//! results, the status word (condition codes, exception flags, TOP) and,
//! for FCOMI, EFLAGS must agree bit for bit; forms ending in FNSAVE run with
//! random exception masks and compare the whole saved state (unmasked
//! responses: suppressed or bias-adjusted results, ES/B). The
//! transcendentals must be within one ulp of the host (special operands:
//! exact). Plus directed tests of the stack, FXAM, FSTSW AX, FNSAVE, #MF,
//! #NM and Linux's FDIV-bug check.
//!
//! `X87_CASES` sets the number of cases per instruction form (default
//! 1500; the run prints the total), `X87_SEED` the generator's seed.

#![cfg(target_arch = "x86_64")]

mod common;
use common::*;
use iced_x86::code_asm::*;
use popek_cpu::{Cpu, RunExit};

/// The shared buffer both sides use (offsets are part of the asm bodies).
const A: usize = 0; // operand a (m80)
const B: usize = 16; // operand b (m80)
const M: usize = 32; // memory operand (m16/m32/m64/m80/BCD)
const OUT: usize = 48; // ST0 after the body (m80)
const SW: usize = 64; // FSW after the body
const OUT2: usize = 72; // ST1 after the body (m80)
const MO: usize = 96; // memory result (up to 10 bytes)
const FL: usize = 112; // EFLAGS after FCOMI
const CW: usize = 120; // (control word)
const SAVE: usize = 128; // FNSAVE image (108 bytes)
const BUF: usize = 240;

type Buf = [u8; BUF];

/// Guest addresses of the model's program and buffer.
const CODE: u64 = 0x1000;
const DATA: u64 = 0x4000;

/// Forms whose exceptions may be unmasked: the body ends with FNSAVE (a
/// non-waiting instruction, so the host raises no #MF/SIGFPE) and the
/// whole saved image is compared.
macro_rules! native_save {
    ($name:ident, $($body:literal),+) => {
        fn $name(buf: &mut Buf) {
            // SAFETY: as for `native!`; FNSAVE writes 108 bytes at
            // `p + 128` < BUF and leaves the FPU initialized; FNINIT then
            // clears any pending exception before Rust code runs again.
            unsafe {
                std::arch::asm!(
                    "fninit",
                    "fldcw word ptr [{p}+120]",
                    $($body,)+
                    "fnsave [{p}+128]",
                    "fninit",
                    p = in(reg) buf.as_mut_ptr(),
                    out("rax") _,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                );
            }
        }
    };
}

native_save!(
    u_fadd,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fadd st(0), st(1)"
);
native_save!(
    u_fsubp,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fsubp st(1), st(0)"
);
native_save!(
    u_fmul,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fmul st(0), st(1)"
);
native_save!(
    u_fdivr,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fdivr st(0), st(1)"
);
native_save!(u_fsqrt, "fld tbyte ptr [{p}]", "fsqrt");
native_save!(
    u_fscale,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fscale"
);
native_save!(
    u_fcomp,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fcomp st(1)"
);
native_save!(u_fst_m32, "fld tbyte ptr [{p}]", "fst dword ptr [{p}+96]");
native_save!(
    u_fistp_m16,
    "fld tbyte ptr [{p}]",
    "fistp word ptr [{p}+96]"
);
native_save!(u_fld_m64, "fld tbyte ptr [{p}]", "fld qword ptr [{p}+32]");
native_save!(u_fdiv_m32, "fld tbyte ptr [{p}]", "fdiv dword ptr [{p}+32]");
native_save!(
    u_overflow,
    "fld tbyte ptr [{p}]",
    "fld st(0)",
    "fld st(0)",
    "fld st(0)",
    "fld st(0)",
    "fld st(0)",
    "fld st(0)",
    "fld st(0)",
    "fld st(0)"
);
native_save!(
    u_fldcw,
    "fninit",
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fdiv st(0), st(1)",
    "fldcw word ptr [{p}+32]"
);
native_save!(u_underflow, "fld tbyte ptr [{p}]", "fmul st(0), st(3)");

macro_rules! native {
    ($name:ident, $($body:literal),+) => {
        fn $name(buf: &mut Buf) {
            // SAFETY: the asm reads and writes only `buf` through `p`
            // (offsets < BUF), uses the x87 stack it declares clobbered,
            // and leaves it empty with the default control word (FNINIT),
            // as the ABI requires.
            unsafe {
                std::arch::asm!(
                    "fninit",
                    "fldcw word ptr [{p}+120]",
                    $($body,)+
                    "fnstsw word ptr [{p}+64]",
                    "fstp tbyte ptr [{p}+48]",
                    "fstp tbyte ptr [{p}+72]",
                    "fninit",
                    p = in(reg) buf.as_mut_ptr(),
                    out("rax") _,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                );
            }
        }
    };
}

native!(
    n_fadd,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fadd st(0), st(1)"
);
native!(
    n_fsub,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fsub st(0), st(1)"
);
native!(
    n_fsubr,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fsubr st(0), st(1)"
);
native!(
    n_fmul,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fmul st(0), st(1)"
);
native!(
    n_fdiv,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fdiv st(0), st(1)"
);
native!(
    n_fdivr,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fdivr st(0), st(1)"
);
native!(
    n_faddp,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "faddp st(1), st(0)"
);
native!(
    n_fsubp,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fsubp st(1), st(0)"
);
native!(n_fadd_m32, "fld tbyte ptr [{p}]", "fadd dword ptr [{p}+32]");
native!(n_fmul_m64, "fld tbyte ptr [{p}]", "fmul qword ptr [{p}+32]");
native!(
    n_fdivr_m64,
    "fld tbyte ptr [{p}]",
    "fdivr qword ptr [{p}+32]"
);
native!(
    n_fisub_m32,
    "fld tbyte ptr [{p}]",
    "fisub dword ptr [{p}+32]"
);
native!(
    n_fidiv_m16,
    "fld tbyte ptr [{p}]",
    "fidiv word ptr [{p}+32]"
);
native!(n_fsqrt, "fld tbyte ptr [{p}]", "fsqrt");
native!(n_frndint, "fld tbyte ptr [{p}]", "frndint");
native!(
    n_fscale,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fscale"
);
native!(
    n_fprem,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fprem"
);
native!(
    n_fprem1,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fprem1"
);
native!(n_fxtract, "fld tbyte ptr [{p}]", "fxtract");
native!(n_fchs, "fld tbyte ptr [{p}]", "fchs");
native!(n_fabs, "fld tbyte ptr [{p}]", "fabs");
native!(
    n_fcom,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fcom st(1)"
);
native!(
    n_fucomp,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fucomp st(1)"
);
native!(
    n_fcompp,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fcompp"
);
native!(n_fcom_m64, "fld tbyte ptr [{p}]", "fcom qword ptr [{p}+32]");
native!(
    n_ficom_m16,
    "fld tbyte ptr [{p}]",
    "ficom word ptr [{p}+32]"
);
native!(n_ftst, "fld tbyte ptr [{p}]", "ftst");
native!(n_fxam, "fld tbyte ptr [{p}]", "fxam");
native!(
    n_fcomi,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fcomi st, st(1)",
    "pushfq",
    "pop rax",
    "mov qword ptr [{p}+112], rax"
);
native!(
    n_fucomip,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fucomip st, st(1)",
    "pushfq",
    "pop rax",
    "mov qword ptr [{p}+112], rax"
);
native!(n_fst_m32, "fld tbyte ptr [{p}]", "fst dword ptr [{p}+96]");
native!(n_fstp_m64, "fld tbyte ptr [{p}]", "fstp qword ptr [{p}+96]");
native!(n_fist_m16, "fld tbyte ptr [{p}]", "fist word ptr [{p}+96]");
native!(n_fist_m32, "fld tbyte ptr [{p}]", "fist dword ptr [{p}+96]");
native!(
    n_fistp_m64,
    "fld tbyte ptr [{p}]",
    "fistp qword ptr [{p}+96]"
);
native!(
    n_fisttp_m32,
    "fld tbyte ptr [{p}]",
    "fisttp dword ptr [{p}+96]"
);
native!(n_fbstp, "fld tbyte ptr [{p}]", "fbstp tbyte ptr [{p}+96]");
native!(n_fld_m32, "fld dword ptr [{p}+32]");
native!(n_fld_m64, "fld qword ptr [{p}+32]");
native!(n_fild_m64, "fild qword ptr [{p}+32]");
native!(n_fild_m16, "fild word ptr [{p}+32]");
native!(n_fbld, "fbld tbyte ptr [{p}+32]");
native!(
    n_consts,
    "fldpi",
    "fldl2e",
    "fldl2t",
    "fldlg2",
    "fldln2",
    "fld1",
    "fldz",
    "fstp tbyte ptr [{p}+96]"
);

native!(
    n_fiadd_m16,
    "fld tbyte ptr [{p}]",
    "fiadd word ptr [{p}+32]"
);
native!(
    n_fimul_m32,
    "fld tbyte ptr [{p}]",
    "fimul dword ptr [{p}+32]"
);
native!(
    n_fisubr_m16,
    "fld tbyte ptr [{p}]",
    "fisubr word ptr [{p}+32]"
);
native!(
    n_fidivr_m32,
    "fld tbyte ptr [{p}]",
    "fidivr dword ptr [{p}+32]"
);
native!(
    n_fsubr_m32,
    "fld tbyte ptr [{p}]",
    "fsubr dword ptr [{p}+32]"
);
native!(n_fdiv_m64, "fld tbyte ptr [{p}]", "fdiv qword ptr [{p}+32]");
native!(
    n_fcomp_m32,
    "fld tbyte ptr [{p}]",
    "fcomp dword ptr [{p}+32]"
);
native!(
    n_ficomp_m32,
    "fld tbyte ptr [{p}]",
    "ficomp dword ptr [{p}+32]"
);
native!(
    n_fucompp,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fucompp"
);
native!(
    n_fcomip,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fcomip st, st(1)",
    "pushfq",
    "pop rax",
    "mov qword ptr [{p}+112], rax"
);
native!(
    n_fucomi,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fucomi st, st(1)",
    "pushfq",
    "pop rax",
    "mov qword ptr [{p}+112], rax"
);
native!(
    n_fxch,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fxch st(1)"
);
native!(n_fxch_empty, "fld tbyte ptr [{p}]", "fxch st(3)");
native!(
    n_fld_st,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fld st(1)"
);
native!(
    n_fst_st,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fst st(1)"
);
native!(
    n_fstp_st,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fld1",
    "fstp st(2)"
);
native!(n_fstp_m80, "fld tbyte ptr [{p}]", "fstp tbyte ptr [{p}+96]");
native!(
    n_fcmov,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fcomi st, st(1)",
    "fcmovb st, st(1)",
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fucomi st, st(1)",
    "fcmovnbe st, st(1)",
    "fcmovu st, st(2)",
    "fcmove st, st(3)"
);
native!(
    n_fstack,
    "fld tbyte ptr [{p}]",
    "fdecstp",
    "fdecstp",
    "fld1",
    "fincstp",
    "ffree st(0)",
    "fld st(2)"
);
native!(
    n_fisttp_m64,
    "fld tbyte ptr [{p}]",
    "fisttp qword ptr [{p}+96]"
);
native!(
    n_fistp_m16,
    "fld tbyte ptr [{p}]",
    "fistp word ptr [{p}+96]"
);
native!(
    n_fsqrt_reg2,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fsqrt",
    "fxch st(1)",
    "fsqrt"
);

type Asm = fn(&mut CodeAssembler) -> Result<(), IcedError>;

fn m80(o: usize) -> AsmMemoryOperand {
    tword_ptr(ebx + o as i32)
}
fn m64(o: usize) -> AsmMemoryOperand {
    qword_ptr(ebx + o as i32)
}
fn m32(o: usize) -> AsmMemoryOperand {
    dword_ptr(ebx + o as i32)
}
fn m16(o: usize) -> AsmMemoryOperand {
    word_ptr(ebx + o as i32)
}

/// How operands are generated for a form.
#[derive(Clone, Copy, PartialEq)]
enum Gen {
    /// Two m80 operands.
    Two,
    /// One m80 operand in `a`.
    One,
    /// m80 `a` and a float32 in `m`.
    F32,
    /// m80 `a` and a float64 in `m`.
    F64,
    /// m80 `a` and an int in `m`.
    Int,
    /// A packed BCD in `m`.
    Bcd,
    /// Two operands with nearby exponents (remainder, cancellation).
    Near,
}

struct Form {
    name: &'static str,
    native: fn(&mut Buf),
    model: Asm,
    gen: Gen,
    /// Unmasked exceptions, FNSAVE epilogue.
    save: bool,
}

macro_rules! form {
    ($name:literal, $n:ident, $g:ident, |$a:ident| $body:expr) => {
        Form {
            name: $name,
            native: $n,
            model: |$a: &mut CodeAssembler| -> Result<(), IcedError> { $body },
            gen: Gen::$g,
            save: false,
        }
    };
    (save $name:literal, $n:ident, $g:ident, |$a:ident| $body:expr) => {
        Form {
            name: $name,
            native: $n,
            model: |$a: &mut CodeAssembler| -> Result<(), IcedError> { $body },
            gen: Gen::$g,
            save: true,
        }
    };
}

fn forms() -> Vec<Form> {
    vec![
        form!("fadd", n_fadd, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fadd_2(st0, st1)
        }),
        form!("fsub", n_fsub, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fsub_2(st0, st1)
        }),
        form!("fsubr", n_fsubr, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fsubr_2(st0, st1)
        }),
        form!("fmul", n_fmul, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fmul_2(st0, st1)
        }),
        form!("fdiv", n_fdiv, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fdiv_2(st0, st1)
        }),
        form!("fdivr", n_fdivr, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fdivr_2(st0, st1)
        }),
        form!("faddp", n_faddp, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.faddp(st1, st0)
        }),
        form!("fsubp", n_fsubp, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fsubp(st1, st0)
        }),
        form!("fadd m32", n_fadd_m32, F32, |a| {
            a.fld(m80(A))?;
            a.fadd(m32(M))
        }),
        form!("fmul m64", n_fmul_m64, F64, |a| {
            a.fld(m80(A))?;
            a.fmul(m64(M))
        }),
        form!("fdivr m64", n_fdivr_m64, F64, |a| {
            a.fld(m80(A))?;
            a.fdivr(m64(M))
        }),
        form!("fisub m32", n_fisub_m32, Int, |a| {
            a.fld(m80(A))?;
            a.fisub(m32(M))
        }),
        form!("fidiv m16", n_fidiv_m16, Int, |a| {
            a.fld(m80(A))?;
            a.fidiv(m16(M))
        }),
        form!("fsqrt", n_fsqrt, One, |a| {
            a.fld(m80(A))?;
            a.fsqrt()
        }),
        form!("frndint", n_frndint, One, |a| {
            a.fld(m80(A))?;
            a.frndint()
        }),
        form!("fscale", n_fscale, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fscale()
        }),
        form!("fprem", n_fprem, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fprem()
        }),
        form!("fprem1", n_fprem1, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fprem1()
        }),
        form!("fxtract", n_fxtract, One, |a| {
            a.fld(m80(A))?;
            a.fxtract()
        }),
        form!("fchs", n_fchs, One, |a| {
            a.fld(m80(A))?;
            a.fchs()
        }),
        form!("fabs", n_fabs, One, |a| {
            a.fld(m80(A))?;
            a.fabs()
        }),
        form!("fcom", n_fcom, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fcom_2(st0, st1)
        }),
        form!("fucomp", n_fucomp, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fucomp(st0, st1)
        }),
        form!("fcompp", n_fcompp, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fcompp()
        }),
        form!("fcom m64", n_fcom_m64, F64, |a| {
            a.fld(m80(A))?;
            a.fcom(m64(M))
        }),
        form!("ficom m16", n_ficom_m16, Int, |a| {
            a.fld(m80(A))?;
            a.ficom(m16(M))
        }),
        form!("ftst", n_ftst, One, |a| {
            a.fld(m80(A))?;
            a.ftst()
        }),
        form!("fxam", n_fxam, One, |a| {
            a.fld(m80(A))?;
            a.fxam()
        }),
        form!("fcomi", n_fcomi, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fcomi(st0, st1)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.mov(m32(FL), eax)
        }),
        form!("fucomip", n_fucomip, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fucomip(st0, st1)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.mov(m32(FL), eax)
        }),
        form!("fst m32", n_fst_m32, One, |a| {
            a.fld(m80(A))?;
            a.fst(m32(MO))
        }),
        form!("fstp m64", n_fstp_m64, One, |a| {
            a.fld(m80(A))?;
            a.fstp(m64(MO))
        }),
        form!("fist m16", n_fist_m16, One, |a| {
            a.fld(m80(A))?;
            a.fist(m16(MO))
        }),
        form!("fist m32", n_fist_m32, One, |a| {
            a.fld(m80(A))?;
            a.fist(m32(MO))
        }),
        form!("fistp m64", n_fistp_m64, One, |a| {
            a.fld(m80(A))?;
            a.fistp(m64(MO))
        }),
        form!("fisttp m32", n_fisttp_m32, One, |a| {
            a.fld(m80(A))?;
            a.fisttp(m32(MO))
        }),
        form!("fbstp", n_fbstp, One, |a| {
            a.fld(m80(A))?;
            a.fbstp(m80(MO))
        }),
        form!("fld m32", n_fld_m32, F32, |a| a.fld(m32(M))),
        form!("fld m64", n_fld_m64, F64, |a| a.fld(m64(M))),
        form!("fild m64", n_fild_m64, Int, |a| a.fild(m64(M))),
        form!("fild m16", n_fild_m16, Int, |a| a.fild(m16(M))),
        form!("fbld", n_fbld, Bcd, |a| a.fbld(m80(M))),
        form!(save "unmasked fadd", u_fadd, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fadd_2(st0, st1)
        }),
        form!(save "unmasked fsubp", u_fsubp, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fsubp(st1, st0)
        }),
        form!(save "unmasked fmul", u_fmul, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fmul_2(st0, st1)
        }),
        form!(save "unmasked fdivr", u_fdivr, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fdivr_2(st0, st1)
        }),
        form!(save "unmasked fsqrt", u_fsqrt, One, |a| {
            a.fld(m80(A))?;
            a.fsqrt()
        }),
        form!(save "unmasked fscale", u_fscale, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fscale()
        }),
        form!(save "unmasked fcomp", u_fcomp, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fcomp_2(st0, st1)
        }),
        form!(save "unmasked fst m32", u_fst_m32, One, |a| {
            a.fld(m80(A))?;
            a.fst(m32(MO))
        }),
        form!(save "unmasked fistp m16", u_fistp_m16, One, |a| {
            a.fld(m80(A))?;
            a.fistp(m16(MO))
        }),
        form!(save "unmasked fld m64", u_fld_m64, F64, |a| {
            a.fld(m80(A))?;
            a.fld(m64(M))
        }),
        form!(save "unmasked fdiv m32", u_fdiv_m32, F32, |a| {
            a.fld(m80(A))?;
            a.fdiv(m32(M))
        }),
        form!(save "unmasked overflow", u_overflow, One, |a| {
            a.fld(m80(A))?;
            for _ in 0..8 {
                a.fld(st0)?;
            }
            Ok(())
        }),
        form!(save "fldcw unmasking", u_fldcw, Int, |a| {
            a.fninit()?;
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fdiv_2(st0, st1)?;
            a.fldcw(m16(M))
        }),
        form!(save "unmasked underflow", u_underflow, One, |a| {
            a.fld(m80(A))?;
            a.fmul_2(st0, st3)
        }),
        form!("fiadd m16", n_fiadd_m16, Int, |a| {
            a.fld(m80(A))?;
            a.fiadd(m16(M))
        }),
        form!("fimul m32", n_fimul_m32, Int, |a| {
            a.fld(m80(A))?;
            a.fimul(m32(M))
        }),
        form!("fisubr m16", n_fisubr_m16, Int, |a| {
            a.fld(m80(A))?;
            a.fisubr(m16(M))
        }),
        form!("fidivr m32", n_fidivr_m32, Int, |a| {
            a.fld(m80(A))?;
            a.fidivr(m32(M))
        }),
        form!("fsubr m32", n_fsubr_m32, F32, |a| {
            a.fld(m80(A))?;
            a.fsubr(m32(M))
        }),
        form!("fdiv m64", n_fdiv_m64, F64, |a| {
            a.fld(m80(A))?;
            a.fdiv(m64(M))
        }),
        form!("fcomp m32", n_fcomp_m32, F32, |a| {
            a.fld(m80(A))?;
            a.fcomp(m32(M))
        }),
        form!("ficomp m32", n_ficomp_m32, Int, |a| {
            a.fld(m80(A))?;
            a.ficomp(m32(M))
        }),
        form!("fucompp", n_fucompp, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fucompp()
        }),
        form!("fcomip", n_fcomip, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fcomip(st0, st1)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.mov(m32(FL), eax)
        }),
        form!("fucomi", n_fucomi, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fucomi(st0, st1)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.mov(m32(FL), eax)
        }),
        form!("fxch", n_fxch, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fxch(st0, st1)
        }),
        form!("fxch empty", n_fxch_empty, One, |a| {
            a.fld(m80(A))?;
            a.fxch(st0, st3)
        }),
        form!("fld st(1)", n_fld_st, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fld(st1)
        }),
        form!("fst st(1)", n_fst_st, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fst(st1)
        }),
        form!("fstp st(2)", n_fstp_st, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fld1()?;
            a.fstp(st2)
        }),
        form!("fstp m80", n_fstp_m80, One, |a| {
            a.fld(m80(A))?;
            a.fstp(m80(MO))
        }),
        form!("fcmov", n_fcmov, Near, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fcomi(st0, st1)?;
            a.fcmovb(st0, st1)?;
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fucomi(st0, st1)?;
            a.fcmovnbe(st0, st1)?;
            a.fcmovu(st0, st2)?;
            a.fcmove(st0, st3)
        }),
        form!("fdecstp/fincstp/ffree", n_fstack, One, |a| {
            a.fld(m80(A))?;
            a.fdecstp()?;
            a.fdecstp()?;
            a.fld1()?;
            a.fincstp()?;
            a.ffree(st0)?;
            a.fld(st2)
        }),
        form!("fisttp m64", n_fisttp_m64, One, |a| {
            a.fld(m80(A))?;
            a.fisttp(m64(MO))
        }),
        form!("fistp m16", n_fistp_m16, One, |a| {
            a.fld(m80(A))?;
            a.fistp(m16(MO))
        }),
        form!("fsqrt x2", n_fsqrt_reg2, Two, |a| {
            a.fld(m80(B))?;
            a.fld(m80(A))?;
            a.fsqrt()?;
            a.fxch(st0, st1)?;
            a.fsqrt()
        }),
        form!("constants", n_consts, One, |a| {
            a.fldpi()?;
            a.fldl2e()?;
            a.fldl2t()?;
            a.fldlg2()?;
            a.fldln2()?;
            a.fld1()?;
            a.fldz()?;
            a.fstp(m80(MO))
        }),
    ]
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random 80-bit value, biased towards the interesting ones.
fn rand_f80(r: &mut Rng) -> (u64, u16) {
    let sign = (r.below(2) as u16) << 15;
    let mant_rand = |r: &mut Rng| match r.below(4) {
        0 => r.next() & !((1u64 << r.below(64)) - 1), // few low bits
        1 => r.next() | ((1u64 << r.below(64)) - 1),  // many low ones
        _ => r.next(),
    };
    let (m, e): (u64, u16) = match r.below(24) {
        0 => (0, 0),
        1 => (1 << 63, 0x7fff),
        2 => ((1 << 63) | (1 << 62) | (mant_rand(r) >> 2), 0x7fff), // QNaN
        3 => ((1 << 63) | (mant_rand(r) >> 2).max(1), 0x7fff),      // SNaN
        4 => (mant_rand(r) >> 1, 0),                                // denormal
        5 => (mant_rand(r) | (1 << 63), 0),                         // pseudo-denormal
        6 => (mant_rand(r) >> 1, r.below(0x7ffe) as u16 + 1),       // unnormal
        7 => (mant_rand(r) >> 1, 0x7fff),                           // pseudo-NaN/inf
        8 => (mant_rand(r) | (1 << 63), r.below(80) as u16 + 1),    // near underflow
        9 => (mant_rand(r) | (1 << 63), 0x7ffe - r.below(80) as u16), // near overflow
        10 => (1 << 63, 0x3fff + r.below(130) as u16 - 65),         // powers of two
        11 => (
            (r.next() & 0xffff_ff00_0000_0000) | (1 << 63),
            0x3fff + r.below(300) as u16 - 150,
        ), // float-exact
        12 => (mant_rand(r) | (1 << 63), r.below(0x7ffe) as u16 + 1), // any normal
        13 => {
            // An integer value.
            let v = r.next() >> r.below(64);
            if v == 0 {
                (0, 0)
            } else {
                let lz = v.leading_zeros();
                (v << lz, (16383 + 63 - lz) as u16)
            }
        }
        _ => (mant_rand(r) | (1 << 63), 0x3fff + r.below(140) as u16 - 70),
    };
    (m, e | sign)
}

fn put80(buf: &mut Buf, o: usize, v: (u64, u16)) {
    buf[o..o + 8].copy_from_slice(&v.0.to_le_bytes());
    buf[o + 8..o + 10].copy_from_slice(&v.1.to_le_bytes());
}

fn get80(buf: &Buf, o: usize) -> (u64, u16) {
    (
        u64::from_le_bytes(buf[o..o + 8].try_into().unwrap()),
        u16::from_le_bytes(buf[o + 8..o + 10].try_into().unwrap()),
    )
}

fn rand_f64(r: &mut Rng) -> u64 {
    let s = r.below(2) << 63;
    match r.below(10) {
        0 => s,
        1 => s | 0x7ff0_0000_0000_0000,
        2 => s | 0x7ff0_0000_0000_0000 | r.next() >> 12 | 1,
        3 => s | (r.next() >> 12),
        4 => s | ((r.below(60) + 1000) << 52) | (r.next() >> 12),
        5 => s | ((r.below(0x7fe) + 1) << 52) | (r.next() >> 12),
        _ => s | ((1023 + r.below(120) - 60) << 52) | (r.next() >> 12),
    }
}

fn rand_f32(r: &mut Rng) -> u64 {
    let s = (r.below(2) << 31) as u32;
    (match r.below(10) {
        0 => s,
        1 => s | 0x7f80_0000,
        2 => s | 0x7f80_0000 | (r.next() as u32 >> 9) | 1,
        3 => s | (r.next() as u32 >> 9),
        4 => s | (((r.below(254) + 1) as u32) << 23) | (r.next() as u32 >> 9),
        _ => s | (((127 + r.below(60) - 30) as u32) << 23) | (r.next() as u32 >> 9),
    }) as u64
}

fn rand_bcd(r: &mut Rng) -> [u8; 10] {
    let mut b = [0u8; 10];
    let digits = r.below(19);
    for i in 0..digits as usize {
        let d = r.below(10) as u8;
        b[i / 2] |= if i % 2 == 0 { d } else { d << 4 };
    }
    b[9] = if r.below(2) == 0 { 0 } else { 0x80 };
    b
}

fn gen_case(r: &mut Rng, g: Gen, save: bool, buf: &mut Buf) {
    buf.fill(0);
    let a = rand_f80(r);
    put80(buf, A, a);
    let b = if g == Gen::Near && r.below(4) != 0 {
        let mut b = rand_f80(r);
        let ea = (a.1 & 0x7fff) as i32;
        let delta = match r.below(4) {
            0 => r.below(3) as i32 - 1,
            1 => r.below(70) as i32,
            2 => r.below(200) as i32 + 60,
            _ => -(r.below(3) as i32),
        };
        let eb = (ea - delta).clamp(1, 0x7ffe);
        b.0 |= 1 << 63;
        if r.below(3) == 0 {
            b.0 = a.0 ^ (r.next() >> r.below(64));
        }
        b.1 = (b.1 & 0x8000) | eb as u16;
        b
    } else {
        rand_f80(r)
    };
    put80(buf, B, b);
    match g {
        Gen::F32 => buf[M..M + 8].copy_from_slice(&rand_f32(r).to_le_bytes()),
        Gen::F64 => buf[M..M + 8].copy_from_slice(&rand_f64(r).to_le_bytes()),
        Gen::Int => {
            let v = (r.next() as i64) >> r.below(64);
            buf[M..M + 8].copy_from_slice(&v.to_le_bytes());
        }
        Gen::Bcd => buf[M..M + 10].copy_from_slice(&rand_bcd(r)),
        _ => {}
    }
    let rc = r.below(4) as u16;
    let pc = [0u16, 2, 3][r.below(3) as usize];
    let masks = if save { r.next() as u16 & 0x3f } else { 0x3f };
    let cw = 0x40 | masks | (pc << 8) | (rc << 10);
    buf[CW..CW + 2].copy_from_slice(&cw.to_le_bytes());
}

/// The model side: one program per form, run once per case.
struct Model {
    cpu: Cpu,
    bus: TestBus,
}

impl Model {
    fn new(f: &Form) -> Model {
        let code = asm32(CODE, |a| {
            a.mov(ebx, DATA as u32).unwrap();
            a.fninit().unwrap();
            a.fldcw(m16(CW)).unwrap();
            (f.model)(a).unwrap();
            if f.save {
                a.fnsave(m80(SAVE)).unwrap();
            } else {
                a.fnstsw(m16(SW)).unwrap();
                a.fstp(m80(OUT)).unwrap();
                a.fstp(m80(OUT2)).unwrap();
            }
            a.fninit().unwrap();
            a.hlt().unwrap();
        });
        let mut cpu = cpu(1);
        // FISTTP needs SSE3 in CPUID (the default model has none).
        cpu.cpuid.basic[1].ecx |= 1;
        start_flat(&mut cpu, CODE, &code);
        Model {
            cpu,
            bus: TestBus::default(),
        }
    }

    fn run(&mut self, buf: &mut Buf) {
        self.cpu.ram().write(DATA, buf).unwrap();
        let mut s = popek_cpu::CpuState::flat_protected(0x08, 0x10);
        s.rip = CODE;
        s.gpr[4] = 0x8000;
        s.cr0 |= 1 << 5; // NE
        self.cpu.set_state(s);
        let exit = self.cpu.run(&mut self.bus, 1000);
        assert_eq!(exit, RunExit::Halted, "model did not reach HLT");
        self.cpu.ram().read(DATA, buf).unwrap();
    }
}

fn describe(buf: &Buf, g: Gen) -> String {
    let a = get80(buf, A);
    let b = get80(buf, B);
    let cw = u16::from_le_bytes([buf[CW], buf[CW + 1]]);
    let m = u64::from_le_bytes(buf[M..M + 8].try_into().unwrap());
    match g {
        Gen::Two | Gen::Near => format!(
            "a={:04x}:{:016x} b={:04x}:{:016x} cw={cw:04x}",
            a.1, a.0, b.1, b.0
        ),
        Gen::One => format!("a={:04x}:{:016x} cw={cw:04x}", a.1, a.0),
        _ => format!("a={:04x}:{:016x} m={m:016x} cw={cw:04x}", a.1, a.0),
    }
}

fn results(buf: &Buf) -> String {
    let o = get80(buf, OUT);
    let o2 = get80(buf, OUT2);
    let sw = u16::from_le_bytes([buf[SW], buf[SW + 1]]);
    let mo = u128::from_le_bytes(buf[MO..MO + 16].try_into().unwrap());
    let fl = u32::from_le_bytes(buf[FL..FL + 4].try_into().unwrap()) & 0x8d5;
    let img: String = save_image(buf).iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "st0={:04x}:{:016x} st1={:04x}:{:016x} fsw={sw:04x} mem={mo:020x} eflags={fl:03x} save={img}",
        o.1, o.0, o2.1, o2.0
    )
}

/// The FNSAVE image without the instruction/data pointers (the host's are
/// 64-bit addresses) and the opcode (recent Intel CPUs keep FOP only for
/// unmasked exceptions).
fn save_image(b: &Buf) -> Vec<u8> {
    let mut v = b[SAVE..SAVE + 12].to_vec();
    let fsw = u16::from_le_bytes([b[SAVE + 4], b[SAVE + 5]]);
    let ftw = u16::from_le_bytes([b[SAVE + 8], b[SAVE + 9]]);
    let top = ((fsw >> 11) & 7) as usize;
    for i in 0..8 {
        let o = SAVE + 28 + 10 * i;
        // Empty registers keep stale contents: leave them out.
        if (ftw >> (2 * ((top + i) & 7))) & 3 == 3 {
            v.extend_from_slice(&[0; 10]);
        } else {
            v.extend_from_slice(&b[o..o + 10]);
        }
    }
    v
}

fn outputs_equal(x: &Buf, y: &Buf) -> bool {
    save_image(x) == save_image(y)
        && x[OUT..OUT + 10] == y[OUT..OUT + 10]
        && x[OUT2..OUT2 + 10] == y[OUT2..OUT2 + 10]
        && x[SW..SW + 2] == y[SW..SW + 2]
        && x[MO..MO + 10] == y[MO..MO + 10]
        && (u32::from_le_bytes(x[FL..FL + 4].try_into().unwrap()) & 0x8d5)
            == (u32::from_le_bytes(y[FL..FL + 4].try_into().unwrap()) & 0x8d5)
}

#[test]
fn x87_matches_host_silicon() {
    let per_form: usize = std::env::var("X87_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let seed = std::env::var("X87_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut rng = Rng(seed | 1);
    let mut total = 0usize;
    let mut mismatches = 0usize;
    let mut report = String::new();
    for f in forms() {
        let mut model = Model::new(&f);
        let mut bad = 0;
        for _ in 0..per_form {
            let mut native = [0u8; BUF];
            gen_case(&mut rng, f.gen, f.save, &mut native);
            let mut sim = native;
            (f.native)(&mut native);
            model.run(&mut sim);
            total += 1;
            if !outputs_equal(&native, &sim) {
                bad += 1;
                if bad <= 4 {
                    report += &format!(
                        "{}: {}\n   host  {}\n   model {}\n",
                        f.name,
                        describe(&native, f.gen),
                        results(&native),
                        results(&sim)
                    );
                }
            }
        }
        if bad > 0 {
            report += &format!("{}: {bad} of {per_form} differ\n", f.name);
        }
        mismatches += bad;
    }
    println!("x87 differential: {total} cases, {mismatches} mismatches");
    assert!(
        mismatches == 0,
        "{report}x87 differential: {total} cases, {mismatches} mismatches"
    );
}

// ---------------------------------------------------------------------------
// Transcendental functions: f64-based in the model, so compared with the
// host within a tolerance rather than bit for bit.

native!(t_fsin, "fld tbyte ptr [{p}]", "fsin");
native!(t_fcos, "fld tbyte ptr [{p}]", "fcos");
native!(t_fptan, "fld tbyte ptr [{p}]", "fptan", "fstp st(0)");
native!(t_fsincos, "fld tbyte ptr [{p}]", "fsincos");
native!(t_f2xm1, "fld tbyte ptr [{p}]", "f2xm1");
native!(
    t_fyl2x,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fyl2x"
);
native!(
    t_fyl2xp1,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fyl2xp1"
);
native!(
    t_fpatan,
    "fld tbyte ptr [{p}+16]",
    "fld tbyte ptr [{p}]",
    "fpatan"
);

/// Distance in units in the last place between two 80-bit values of the
/// same sign (large when the signs differ).
fn ulps(a: (u64, u16), b: (u64, u16)) -> u128 {
    if a == b {
        return 0;
    }
    if (a.1 ^ b.1) & 0x8000 != 0 {
        return u128::MAX;
    }
    let key = |v: (u64, u16)| (((v.1 & 0x7fff) as u128) << 63) | (v.0 & !(1 << 63)) as u128;
    key(a).abs_diff(key(b))
}

#[allow(dead_code)]
fn f80_to_f64(v: (u64, u16)) -> f64 {
    let e = (v.1 & 0x7fff) as i32;
    let mag = if e == 0x7fff {
        if v.0 << 1 == 0 {
            f64::INFINITY
        } else {
            f64::NAN
        }
    } else {
        v.0 as f64 * 2f64.powi(e.max(1) - 16383 - 63)
    };
    if v.1 & 0x8000 != 0 {
        -mag
    } else {
        mag
    }
}

fn f64_to_f80(x: f64) -> (u64, u16) {
    let b = x.to_bits();
    let s = ((b >> 63) as u16) << 15;
    let e = ((b >> 52) & 0x7ff) as u16;
    if x == 0.0 {
        return (0, s);
    }
    (((b << 11) | (1 << 63)), s | (e + 16383 - 1023))
}

#[test]
fn x87_transcendentals_close_to_host() {
    type Case = (&'static str, fn(&mut Buf), Asm, f64, f64);
    let forms: Vec<Case> = vec![
        (
            "fsin",
            t_fsin,
            |a| {
                a.fld(m80(A))?;
                a.fsin()
            },
            -100.0,
            100.0,
        ),
        (
            "fcos",
            t_fcos,
            |a| {
                a.fld(m80(A))?;
                a.fcos()
            },
            -100.0,
            100.0,
        ),
        (
            "fptan",
            t_fptan,
            |a| {
                a.fld(m80(A))?;
                a.fptan()?;
                a.fstp(st0)
            },
            -1.5,
            1.5,
        ),
        (
            "fsincos",
            t_fsincos,
            |a| {
                a.fld(m80(A))?;
                a.fsincos()
            },
            -10.0,
            10.0,
        ),
        (
            "f2xm1",
            t_f2xm1,
            |a| {
                a.fld(m80(A))?;
                a.f2xm1()
            },
            -1.0,
            1.0,
        ),
        (
            "fyl2x",
            t_fyl2x,
            |a| {
                a.fld(m80(B))?;
                a.fld(m80(A))?;
                a.fyl2x()
            },
            0.0,
            1e6,
        ),
        (
            "fyl2xp1",
            t_fyl2xp1,
            |a| {
                a.fld(m80(B))?;
                a.fld(m80(A))?;
                a.fyl2xp1()
            },
            -0.29,
            0.29,
        ),
        (
            "fpatan",
            t_fpatan,
            |a| {
                a.fld(m80(B))?;
                a.fld(m80(A))?;
                a.fpatan()
            },
            -1e3,
            1e3,
        ),
    ];
    let mut rng = Rng(42);
    let mut n = 0;
    let mut report = String::new();
    for (name, native, model_body, lo, hi) in forms {
        let mut worst = 0;
        let mut off = 0;
        let f = Form {
            name,
            native,
            model: model_body,
            gen: Gen::Two,
            save: false,
        };
        let mut model = Model::new(&f);
        for i in 0..1500 {
            let mut buf = [0u8; BUF];
            let x = lo + (hi - lo) * (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let y = (rng.next() >> 11) as f64 / (1u64 << 50) as f64 - 4.0;
            let mut xa = f64_to_f80(x);
            let mut ya = f64_to_f80(y);
            // Full 64-bit significands.
            if xa.0 != 0 {
                xa.0 |= rng.next() >> 53;
            }
            if ya.0 != 0 {
                ya.0 |= rng.next() >> 53;
            }
            if i % 3 == 2 && matches!(name, "fsin" | "fcos" | "fptan" | "fsincos") {
                // Large arguments of the trigonometric functions, up to
                // 2^62: the reduction modulo the 66-bit π/2.
                xa = (
                    rng.next() | 1 << 63,
                    (0x3fff + rng.below(62)) as u16 | (rng.below(2) as u16) << 15,
                );
            }
            put80(&mut buf, A, xa);
            put80(&mut buf, B, ya);
            let cw = 0x37f | (rng.below(4) as u16) << 10;
            buf[CW..CW + 2].copy_from_slice(&cw.to_le_bytes());
            let mut sim = buf;
            (f.native)(&mut buf);
            model.run(&mut sim);
            for o in [OUT, OUT2] {
                let (h, m) = (get80(&buf, o), get80(&sim, o));
                let d = ulps(h, m);
                worst = worst.max(d);
                if d > 0 {
                    off += 1;
                }
                assert!(
                    d <= 1,
                    "{name}({x}, {y}): host {:04x}:{:016x} model {:04x}:{:016x}",
                    h.1,
                    h.0,
                    m.1,
                    m.0
                );
            }
            let sw = |b: &Buf| u16::from_le_bytes([b[SW], b[SW + 1]]) & 0x7f00;
            assert_eq!(sw(&buf) & !0x0200, sw(&sim) & !0x0200, "{name}({x}): FSW");
            n += 1;
        }
        report += &format!(" {name}: {off} results off by {worst} ulp;");
    }
    println!("x87 transcendentals: {n} cases within 1 ulp of the host;{report}");
}

/// Special operands of the transcendental instructions (zeros, infinities,
/// NaNs, unsupported encodings, |x| ≥ 2^63, stack faults): exact.
#[test]
fn x87_transcendental_specials_match_host() {
    let specials: [(u64, u16); 14] = [
        (0, 0),
        (0, 0x8000),
        (1 << 63, 0x7fff),
        (1 << 63, 0xffff),
        (0xc000_0000_0000_0000, 0xffff),
        (0xa000_0000_0000_0001, 0x7fff),
        (0x1234_5678, 0x3fff),
        (1 << 63, 0x403e),
        (0xd000_0000_0000_0000, 0xc07f),
        (1 << 63, 0x3fff),
        (1 << 63, 0xbfff),
        (1 << 63, 0x4000),
        (0x4000_0000_0000_0000, 0),
        (1 << 63, 0x3ffe),
    ];
    type Case = (&'static str, fn(&mut Buf), Asm, bool);
    let forms: Vec<Case> = vec![
        (
            "fsin",
            t_fsin,
            |a| {
                a.fld(m80(A))?;
                a.fsin()
            },
            false,
        ),
        (
            "fcos",
            t_fcos,
            |a| {
                a.fld(m80(A))?;
                a.fcos()
            },
            false,
        ),
        (
            "fptan",
            t_fptan,
            |a| {
                a.fld(m80(A))?;
                a.fptan()?;
                a.fstp(st0)
            },
            false,
        ),
        (
            "fsincos",
            t_fsincos,
            |a| {
                a.fld(m80(A))?;
                a.fsincos()
            },
            false,
        ),
        (
            "fyl2x",
            t_fyl2x,
            |a| {
                a.fld(m80(B))?;
                a.fld(m80(A))?;
                a.fyl2x()
            },
            true,
        ),
        (
            "fpatan",
            t_fpatan,
            |a| {
                a.fld(m80(B))?;
                a.fld(m80(A))?;
                a.fpatan()
            },
            true,
        ),
    ];
    let mut n = 0;
    let mut bad = String::new();
    for (name, native, model_body, two) in forms {
        let f = Form {
            name,
            native,
            model: model_body,
            gen: Gen::Two,
            save: false,
        };
        let mut model = Model::new(&f);
        for x in specials {
            for y in if two { &specials[..] } else { &specials[..1] } {
                let mut buf = [0u8; BUF];
                put80(&mut buf, A, x);
                put80(&mut buf, B, *y);
                buf[CW..CW + 2].copy_from_slice(&0x37fu16.to_le_bytes());
                let mut sim = buf;
                (f.native)(&mut buf);
                model.run(&mut sim);
                n += 1;
                // Finite nonzero results are approximations: compare their
                // class only (and PE/C1 may differ).
                let finite = |b: &Buf, o| {
                    let v = get80(b, o);
                    v.1 & 0x7fff != 0x7fff && v.0 != 0
                };
                let same = [OUT, OUT2].iter().all(|&o| {
                    if finite(&buf, o) && finite(&sim, o) {
                        (buf[o + 9] & 0x80) == (sim[o + 9] & 0x80)
                    } else {
                        buf[o..o + 10] == sim[o..o + 10]
                    }
                });
                let sw = |b: &Buf| u16::from_le_bytes([b[SW], b[SW + 1]]) & !0x0220;
                if !same || sw(&buf) != sw(&sim) {
                    bad += &format!(
                        "{name} x={x:x?} y={y:x?}\n   host  {}\n   model {}\n",
                        results(&buf),
                        results(&sim)
                    );
                }
            }
        }
    }
    println!("x87 transcendental specials: {n} cases");
    assert!(bad.is_empty(), "{bad}");
}

// ---------------------------------------------------------------------------
// Directed tests.

/// Runs 32-bit code (flat, ring 0, CR0.NE = 1) to HLT.
fn run_code(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Cpu {
    let mut c = prepare(f, true);
    let mut bus = TestBus::default();
    assert_eq!(c.run(&mut bus, 100_000), RunExit::Halted);
    c
}

fn prepare(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>, ne: bool) -> Cpu {
    let code = asm32(CODE, |a| {
        a.mov(ebx, DATA as u32).unwrap();
        f(a).unwrap();
        a.hlt().unwrap();
    });
    let mut c = cpu(1);
    start_flat(&mut c, CODE, &code);
    if ne {
        c.state_mut().cr0 |= 1 << 5;
    }
    c
}

const INDEF: (u64, u16) = (0xc000_0000_0000_0000, 0xffff);

fn st(c: &mut Cpu, i: usize) -> (u64, u16) {
    let f = c.state().fpu;
    let r = f.regs[(((f.fsw >> 11) as usize) + i) & 7];
    (r.mantissa, r.sign_exp)
}

#[test]
fn stack_overflow_and_underflow_masked_responses() {
    let mut c = run_code(|a| {
        a.fninit()?;
        for _ in 0..8 {
            a.fld1()?;
        }
        a.fldz()?; // ninth push: overflow
        a.fnstsw(ax)?;
        a.mov(ecx, eax)?;
        a.fninit()?;
        a.fld1()?;
        a.fadd_2(st0, st2)?; // ST2 empty: underflow
        a.fstsw(ax) // the WAIT form
    });
    let s = c.state().clone();
    let over = s.gpr[1] as u16;
    // IE | SF | C1 (overflow), TOP = 7 after wrapping around.
    assert_eq!(over & 0x7f, 0x41, "{over:04x}");
    assert_ne!(over & 0x0200, 0);
    assert_eq!((over >> 11) & 7, 7);
    let under = s.gpr[0] as u16;
    assert_eq!(under & 0x7f, 0x41, "{under:04x}");
    assert_eq!(under & 0x0200, 0, "C1 = 0 on underflow");
    assert_eq!(
        st(&mut c, 0),
        INDEF,
        "masked underflow writes the indefinite"
    );
}

#[test]
fn unmasked_stack_overflow_leaves_the_stack() {
    let mut c = prepare(
        |a| {
            a.fninit()?;
            a.mov(word_ptr(ebx), 0x37eu32)?; // IM unmasked
            a.fldcw(word_ptr(ebx))?;
            for _ in 0..8 {
                a.fld1()?;
            }
            a.fldz()?; // overflow: nothing pushed, ES set
            a.fnstsw(ax)?; // no-wait: no #MF
            a.wait() // #MF here
        },
        true,
    );
    c.exception_bitmap = 1 << 16;
    let mut bus = TestBus::default();
    let exit = c.run(&mut bus, 1000);
    assert!(
        matches!(exit, RunExit::Exception { vector: 16, .. }),
        "{exit:?}"
    );
    let s = c.state().clone();
    let sw = s.gpr[0] as u16;
    assert_eq!(sw & 0xc2ff & !0x0200, 0x80c1, "{sw:04x}: B, ES, SF, IE");
    assert_eq!((sw >> 11) & 7, 0, "TOP unchanged");
    assert_eq!(st(&mut c, 0), (1 << 63, 0x3fff));
    // RIP at the FWAIT.
    assert_eq!(c.ram().read_u8_at(s.rip), 0x9b);
}

trait ReadU8 {
    fn read_u8_at(&self, a: u64) -> u8;
}
impl ReadU8 for std::sync::Arc<popek_memory::GuestRam> {
    fn read_u8_at(&self, a: u64) -> u8 {
        let mut b = [0u8];
        self.read(a, &mut b).unwrap();
        b[0]
    }
}

#[test]
fn unmasked_zero_divide_and_mf_delivery() {
    let prog = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.fninit()?;
        a.mov(word_ptr(ebx), 0x37bu32)?; // ZM unmasked
        a.fldcw(word_ptr(ebx))?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?; // 1/0: ZE, destination unchanged, no pop
        a.fnstsw(ax)?;
        a.mov(ecx, 7u32)?;
        a.wait()?; // #MF (CR0.NE = 1)
        a.mov(ecx, 9u32)
    };
    let mut c = prepare(prog, true);
    c.exception_bitmap = 1 << 16;
    let mut bus = TestBus::default();
    let exit = c.run(&mut bus, 1000);
    assert!(
        matches!(exit, RunExit::Exception { vector: 16, .. }),
        "{exit:?}"
    );
    let s = c.state().clone();
    assert_eq!(s.gpr[1], 7);
    assert_eq!(s.gpr[0] as u16 & 0x80ff, 0x8084, "B, ES, ZE");
    assert_eq!(st(&mut c, 0), (0, 0));
    assert_eq!(st(&mut c, 1), (1 << 63, 0x3fff));
    // CR0.NE = 0: FERR#/IRQ 13 is not modelled; the FWAIT just runs.
    let mut c = prepare(prog, false);
    c.exception_bitmap = 1 << 16;
    assert_eq!(c.run(&mut bus, 1000), RunExit::Halted);
    assert_eq!(c.state().gpr[1], 9);
    // FNCLEX clears the pending exception.
    let mut c = prepare(
        |a| {
            prog_clex(a)?;
            a.wait()
        },
        true,
    );
    c.exception_bitmap = 1 << 16;
    assert_eq!(c.run(&mut bus, 1000), RunExit::Halted);
}

fn prog_clex(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.fninit()?;
    a.mov(word_ptr(ebx), 0x37bu32)?;
    a.fldcw(word_ptr(ebx))?;
    a.fld1()?;
    a.fldz()?;
    a.fdivp(st1, st0)?;
    a.fnclex()
}

#[test]
fn fxam_classes() {
    let values: [((u64, u16), u16); 9] = [
        ((1 << 63, 0x3fff), 0x0400),               // normal
        ((1 << 63, 0xbfff), 0x0600),               // negative normal: C1
        ((0, 0x8000), 0x4200),                     // -0
        ((1 << 63, 0x7fff), 0x0500),               // +inf
        ((0xc000_0000_0000_0000, 0xffff), 0x0300), // -NaN
        ((0x1234, 0), 0x4400),                     // denormal
        ((0x8000_0000_0000_1234, 0), 0x4400),      // pseudo-denormal
        ((0x1234, 0x3fff), 0x0000),                // unnormal: unsupported
        ((0x1234, 0x7fff), 0x0000),                // pseudo-NaN: unsupported
    ];
    for (v, want) in values {
        let mut c = cpu(1);
        let code = asm32(CODE, |a| {
            a.mov(ebx, DATA as u32).unwrap();
            a.fninit().unwrap();
            a.fld(m80(0)).unwrap();
            a.fxam().unwrap();
            a.fnstsw(ax).unwrap();
            a.hlt().unwrap();
        });
        start_flat(&mut c, CODE, &code);
        let mut b = [0u8; 10];
        b[..8].copy_from_slice(&v.0.to_le_bytes());
        b[8..].copy_from_slice(&v.1.to_le_bytes());
        c.ram().write(DATA, &b).unwrap();
        assert_eq!(c.run(&mut TestBus::default(), 100), RunExit::Halted);
        assert_eq!(c.state().gpr[0] as u16 & 0x4700, want, "{v:x?}");
    }
    // Empty: C3 and C0.
    let c = &mut run_code(|a| {
        a.fninit()?;
        a.fxam()?;
        a.fnstsw(ax)
    });
    assert_eq!(c.state().gpr[0] as u16 & 0x4500, 0x4100);
}

#[test]
fn fnsave_after_arithmetic() {
    let mut fdiv_ip = 0;
    let code = asm32(CODE, |a| {
        a.mov(ebx, DATA as u32).unwrap();
        a.fninit().unwrap();
        a.fld(m64(0)).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.fdiv(m64(8)).unwrap();
        a.fnsave(m80(0x40)).unwrap();
        a.fnstcw(m16(0x100)).unwrap();
        a.hlt().unwrap();
    });
    // Find the FDIV (DC 73 08) in the code.
    for i in 0..code.len() - 2 {
        if code[i] == 0xdc && code[i + 1] == 0x73 {
            fdiv_ip = CODE + i as u64;
        }
    }
    assert_ne!(fdiv_ip, 0);
    let mut c = cpu(1);
    start_flat(&mut c, CODE, &code);
    c.ram().write(DATA, &4195835.0f64.to_le_bytes()).unwrap();
    c.ram()
        .write(DATA + 8, &3145727.0f64.to_le_bytes())
        .unwrap();
    assert_eq!(c.run(&mut TestBus::default(), 100), RunExit::Halted);
    let mut img = [0u8; 108];
    c.ram().read(DATA + 0x40, &mut img).unwrap();
    let w = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
    assert_eq!(w(0) & 0xffff, 0x37f, "FCW");
    let fsw = w(4) as u16;
    assert_eq!((fsw >> 11) & 7, 7, "TOP");
    assert_eq!(fsw & 0x3f, 0x20, "PE only");
    assert_eq!(w(8) & 0xffff, 0x3fff, "tags: R7 valid, the rest empty");
    assert_eq!(w(12) as u64, fdiv_ip, "FIP");
    assert_eq!(w(16) & 0xffff, 0x08, "FCS");
    assert_eq!(w(16) >> 16, 0x473, "FOP: DC /6 [ebx+disp8]");
    assert_eq!(w(20) as u64, DATA + 8, "FDP");
    assert_eq!(w(24) & 0xffff, 0x10, "FDS");
    // ST0 = 4195835 / 3145727 rounded to 64 bits, as the host computes.
    let mut host = [0u8; BUF];
    put80(&mut host, A, f64_to_f80(4195835.0));
    put80(&mut host, B, f64_to_f80(3145727.0));
    host[CW..CW + 2].copy_from_slice(&0x37fu16.to_le_bytes());
    n_fdiv(&mut host);
    assert_eq!(&img[28..38], &host[OUT..OUT + 10]);
    // FNSAVE reinitialized the FPU.
    let mut cw = [0u8; 2];
    c.ram().read(DATA + 0x100, &mut cw).unwrap();
    assert_eq!(u16::from_le_bytes(cw), 0x37f);
    assert_eq!(c.state().fpu.ftw, 0xffff);
}

/// Linux's `fpu__init_check_bugs` (arch/x86/kernel/fpu/bugs.c): FDIV bug.
#[test]
fn linux_fdiv_bug_check() {
    let code = asm32(CODE, |a| {
        a.mov(ebx, DATA as u32).unwrap();
        a.fninit().unwrap();
        a.fld(m64(0)).unwrap(); // fldl x
        a.fdiv(m64(8)).unwrap(); // fdivl y
        a.fmul(m64(8)).unwrap(); // fmull y
        a.fld(m64(0)).unwrap(); // fldl x
        a.db(&[0xde, 0xe9]).unwrap(); // fsubp %st,%st(1)
        a.fistp(m32(16)).unwrap(); // fistpl fdiv_bug
        a.wait().unwrap();
        a.fninit().unwrap();
        a.hlt().unwrap();
    });
    let mut c = cpu(1);
    start_flat(&mut c, CODE, &code);
    c.ram().write(DATA, &4195835.0f64.to_le_bytes()).unwrap();
    c.ram()
        .write(DATA + 8, &3145727.0f64.to_le_bytes())
        .unwrap();
    c.ram()
        .write(DATA + 16, &0x5555_5555u32.to_le_bytes())
        .unwrap();
    c.state_mut().cr0 |= 1 << 5;
    assert_eq!(c.run(&mut TestBus::default(), 100), RunExit::Halted);
    assert_eq!(c.ram().read_u32(DATA + 16).unwrap(), 0, "no FDIV bug");
}

#[test]
fn fisttp_needs_sse3() {
    let mut c = prepare(
        |a| {
            a.fld1()?;
            a.fisttp(m32(0))
        },
        true,
    );
    c.exception_bitmap = 1 << 6;
    let exit = c.run(&mut TestBus::default(), 100);
    assert!(
        matches!(exit, RunExit::Exception { vector: 6, .. }),
        "{exit:?}"
    );
}

#[test]
fn device_not_available_with_ts() {
    let mut c = prepare(
        |a| {
            a.fld1()?;
            a.fadd_2(st0, st0)
        },
        true,
    );
    c.state_mut().cr0 |= 1 << 3; // TS
    c.exception_bitmap = 1 << 7;
    let exit = c.run(&mut TestBus::default(), 100);
    assert!(
        matches!(exit, RunExit::Exception { vector: 7, .. }),
        "{exit:?}"
    );
}
