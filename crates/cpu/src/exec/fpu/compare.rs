//! x87 comparisons: FCOM/FUCOM, FTST, FXAM, FCOMI/FUCOMI, FCMOVcc.

use super::*;

pub(crate) fn cmp_cc(r: soft::Cmp) -> u16 {
    match r {
        soft::Cmp::Greater => 0,
        soft::Cmp::Less => C0,
        soft::Cmp::Equal => C3,
        soft::Cmp::Unordered => C3 | C2 | C0,
    }
}

pub(crate) fn fcom(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn ftst(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn fxam(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn fcomi(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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

pub(crate) fn fcmov(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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
