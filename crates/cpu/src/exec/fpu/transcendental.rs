//! x87 transcendental instructions (F2XM1, FYL2X, FPTAN, FPATAN, FSIN,
//! FCOS, FSINCOS, FYL2XP1): operand screening and the two-operand forms,
//! on the approximations in `trans`.

use super::*;

/// Screens one operand of a transcendental: NaNs, unsupported values.
pub(crate) fn trans_screen(env: &mut Env, v: F80) -> Result<Class, F80> {
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

pub(crate) fn nan_of_two(env: &mut Env, a: F80, b: F80) -> Option<F80> {
    let (ca, cb) = (soft::classify(a), soft::classify(b));
    let special = |c: Class| matches!(c, Class::QNaN | Class::SNaN | Class::Unsupported);
    if !special(ca) && !special(cb) {
        return None;
    }
    // Reuse the arithmetic's NaN rules.
    Some(soft::add(env, a, b, false))
}

pub(crate) fn ftrans(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
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
pub(crate) fn two_operand(env: &mut Env, m: Mnemonic, x: F80, y: F80) -> F80 {
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
