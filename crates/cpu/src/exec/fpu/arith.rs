//! x87 arithmetic: the four operations, sign changes, FSQRT/FRNDINT,
//! FSCALE, FXTRACT, FPREM/FPREM1.

use super::*;

pub(crate) fn farith(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn fsign(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn funary(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn fscale(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn fxtract(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn fprem(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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
