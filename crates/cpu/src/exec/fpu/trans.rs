//! The transcendental instructions' functions in double-double arithmetic.
//!
//! Each function is evaluated with about 100 significant bits (pairs of
//! f64, error-free transformations) and rounded once to the 64-bit
//! significand with the FCW's rounding control. The results are therefore
//! within an ulp of the true value and usually correctly rounded; real x87
//! hardware is also within about an ulp, so individual results may differ
//! from a given processor's in the last bit. Like the hardware, FSIN, FCOS,
//! FSINCOS and FPTAN reduce their argument modulo a 66-bit π/2.

use super::soft::{self, Env};
use crate::state::F80;

/// An unevaluated sum hi + lo with |lo| ≤ ulp(hi)/2.
#[derive(Clone, Copy, Debug)]
pub struct DD {
    hi: f64,
    lo: f64,
}

/// A double-double with a separate binary exponent: v × 2^scale.
#[derive(Clone, Copy, Debug)]
pub struct XD {
    v: DD,
    scale: i32,
}

fn two_sum(a: f64, b: f64) -> DD {
    let s = a + b;
    let bb = s - a;
    DD {
        hi: s,
        lo: (a - (s - bb)) + (b - bb),
    }
}

fn quick(a: f64, b: f64) -> DD {
    let s = a + b;
    DD {
        hi: s,
        lo: b - (s - a),
    }
}

fn two_prod(a: f64, b: f64) -> DD {
    let p = a * b;
    DD {
        hi: p,
        lo: a.mul_add(b, -p),
    }
}

const fn c(hi: u64, lo: u64) -> DD {
    DD {
        hi: f64::from_bits(hi),
        lo: f64::from_bits(lo),
    }
}

const PI: DD = c(0x4009_21fb_5444_2d18, 0x3ca1_a626_3314_5c07);
const PI_2: DD = c(0x3ff9_21fb_5444_2d18, 0x3c91_a626_3314_5c07);
const LN2: DD = c(0x3fe6_2e42_fefa_39ef, 0x3c7a_bc9e_3b39_803f);
const ONE: DD = DD { hi: 1.0, lo: 0.0 };

impl DD {
    fn new(hi: f64) -> DD {
        DD { hi, lo: 0.0 }
    }
    fn add(self, o: DD) -> DD {
        let s = two_sum(self.hi, o.hi);
        let t = two_sum(self.lo, o.lo);
        let s = quick(s.hi, s.lo + t.hi);
        quick(s.hi, s.lo + t.lo)
    }
    fn neg(self) -> DD {
        DD {
            hi: -self.hi,
            lo: -self.lo,
        }
    }
    fn sub(self, o: DD) -> DD {
        self.add(o.neg())
    }
    fn mul(self, o: DD) -> DD {
        let p = two_prod(self.hi, o.hi);
        quick(p.hi, p.lo + (self.hi * o.lo + self.lo * o.hi))
    }
    fn div(self, o: DD) -> DD {
        let q1 = self.hi / o.hi;
        let r = self.sub(o.mul(DD::new(q1)));
        let q2 = r.hi / o.hi;
        let r = r.sub(o.mul(DD::new(q2)));
        let q3 = r.hi / o.hi;
        quick(q1, q2).add(DD::new(q3))
    }
    fn sqrt(self) -> DD {
        if self.hi <= 0.0 {
            return DD::new(0.0);
        }
        let s = self.hi.sqrt();
        let r = self.sub(two_prod(s, s));
        quick(s, r.hi / (2.0 * s))
    }
    fn scale(self, e: i32) -> DD {
        let f = pow2(e);
        DD {
            hi: self.hi * f,
            lo: self.lo * f,
        }
    }
}

/// 2^e for |e| ≤ 1022.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((1023 + e.clamp(-1022, 1023)) as u64) << 52)
}

/// A finite nonzero 80-bit value as a double-double in [1, 2) × 2^scale.
fn split(a: F80) -> (bool, XD) {
    let (neg, e, m) = soft::parts(a);
    let hi = (m >> 11) as f64 * pow2(-52);
    let lo = (m & 0x7ff) as f64 * pow2(-63);
    (
        neg,
        XD {
            v: quick(hi, lo),
            scale: e,
        },
    )
}

/// f64 → (integer significand, exponent).
fn decompose(f: f64) -> (i64, i32) {
    let b = f.to_bits();
    let e = ((b >> 52) & 0x7ff) as i32;
    let frac = (b & ((1 << 52) - 1)) as i64;
    let (m, e) = if e == 0 {
        (frac, -1074)
    } else {
        (frac | (1 << 52), e - 1075)
    };
    (if f < 0.0 { -m } else { m }, e)
}

/// Rounds v × 2^scale to an 80-bit value (flags and C1 in `env`).
pub fn to_f80(env: &mut Env, x: XD) -> F80 {
    let v = x.v;
    if v.hi == 0.0 {
        return soft::zero(v.hi.is_sign_negative());
    }
    let (mh, eh) = decompose(v.hi);
    let base = eh - 70;
    let mut s: i128 = (mh as i128) << 70;
    let mut sticky = false;
    if v.lo != 0.0 {
        let (ml, el) = decompose(v.lo);
        let sh = el - base;
        if sh >= 0 {
            s += (ml as i128) << sh.min(60);
        } else if sh > -120 {
            let k = -sh as u32;
            s += (ml as i128) >> k;
            sticky = (ml as i128) & ((1i128 << k) - 1) != 0;
        } else {
            // Far below: contributes only its sign to the rounding.
            s += if ml < 0 { -1 } else { 0 };
            sticky = true;
        }
    }
    let neg = s < 0;
    let mut mag = s.unsigned_abs();
    if neg && sticky {
        mag -= 1;
    }
    if mag == 0 {
        return soft::zero(neg);
    }
    let lz = mag.leading_zeros();
    let sig = (mag << lz) | sticky as u128;
    let r = soft::pack_full(env, neg, base + x.scale - lz as i32 + 127, sig);
    inexact(env, r)
}

/// The hardware reports its transcendental results as inexact even when
/// they happen to be exact, and so a tiny one as an underflow.
fn inexact(env: &mut Env, r: F80) -> F80 {
    env.flags |= soft::PE;
    if r.sign_exp & 0x7fff == 0 && env.masks & soft::UE != 0 {
        env.flags |= soft::UE;
    }
    r
}

/// Σ of a power series in t: first term `t0`, each next term
/// term × `t2` × `ratio(n)`, until the terms vanish.
fn series(t0: DD, t2: DD, ratio: impl Fn(u32) -> DD) -> DD {
    let mut term = t0;
    let mut sum = t0;
    for n in 1..80 {
        term = term.mul(t2).mul(ratio(n));
        sum = sum.add(term);
        if term.hi.abs() < sum.hi.abs() * 1e-35 {
            break;
        }
    }
    sum
}

fn recip(k: f64) -> DD {
    ONE.div(DD::new(k))
}

/// sin and cos of r, |r| ≤ π/4 (about).
fn sin_cos_small(r: DD) -> (DD, DD) {
    let r2 = r.mul(r);
    let s = series(r, r2, |n| recip(-((2 * n) as f64) * (2 * n + 1) as f64));
    let c = series(ONE, r2, |n| recip(-((2 * n - 1) as f64) * (2 * n) as f64));
    (s, c)
}

/// π/2 in units of 2^-65, as the x87 holds it (66 bits).
const PI_2_UNITS: u128 = (0xc90f_daa2_2168_c234u128 << 2) | 3;

/// sin and cos of a finite nonzero x with |x| < 2^63, with the argument
/// reduced modulo the x87's 66-bit π/2.
pub fn sin_cos(x: F80) -> (XD, XD) {
    let (neg, xd) = split(x);
    if xd.scale < -60 {
        // sin x = x − x³/6, cos x = 1 − x²/2: below the last bit.
        let tiny = xd.v.hi * 1e-40;
        let s = XD {
            v: quick(xd.v.hi, xd.v.lo - tiny),
            scale: xd.scale,
        };
        let c = XD {
            v: quick(1.0, -1e-300),
            scale: 0,
        };
        return (if neg { neg_xd(s) } else { s }, c);
    }
    let (_, e, m) = soft::parts(x);
    let (r, k) = if e < -1 {
        (xd.v.scale(e), 0u128)
    } else {
        // X = |x| in units of 2^-65; k = round(X / (π/2)), r = X − kπ/2.
        let xi = (m as u128) << (e + 2) as u32;
        let mut k = xi / PI_2_UNITS;
        let mut rem = (xi % PI_2_UNITS) as i128;
        if 2 * rem > PI_2_UNITS as i128 {
            k += 1;
            rem -= PI_2_UNITS as i128;
        }
        let hi = rem as f64;
        let lo = (rem - hi as i128) as f64;
        (quick(hi, lo).scale(-65), k)
    };
    let (s, c) = sin_cos_small(r);
    let (s, c) = match k & 3 {
        0 => (s, c),
        1 => (c, s.neg()),
        2 => (s.neg(), c.neg()),
        _ => (c.neg(), s),
    };
    let s = if neg { s.neg() } else { s };
    (XD { v: s, scale: 0 }, XD { v: c, scale: 0 })
}

fn neg_xd(x: XD) -> XD {
    XD {
        v: x.v.neg(),
        scale: x.scale,
    }
}

/// tan x from sin and cos.
pub fn tan(s: XD, c: XD) -> XD {
    if s.scale != 0 {
        // Tiny x: tan x = x + x³/3 (`s` carries −x³/6).
        let tiny = s.v.hi * 2e-40;
        return XD {
            v: quick(s.v.hi, s.v.lo + tiny),
            scale: s.scale,
        };
    }
    XD {
        v: s.v.div(c.v),
        scale: 0,
    }
}

/// atan t for t ≥ 0 in double-double range.
fn atan_pos(t: DD) -> DD {
    let inv = t.hi > 1.0;
    let mut t = if inv { ONE.div(t) } else { t };
    // atan t = 2 atan(t / (1 + √(1 + t²))), three times.
    for _ in 0..3 {
        t = t.div(ONE.add(ONE.add(t.mul(t)).sqrt()));
    }
    let t2 = t.mul(t);
    let s = series(t, t2, |n| {
        DD::new(-((2 * n - 1) as f64)).div(DD::new((2 * n + 1) as f64))
    });
    let a = s.scale(3);
    if inv {
        PI_2.sub(a)
    } else {
        a
    }
}

/// FPATAN: atan2(y, x) for finite nonzero x and y.
pub fn atan2(env: &mut Env, y: F80, x: F80) -> F80 {
    let (ny, yd) = split(y);
    let (nx, xd) = split(x);
    let d = yd.scale - xd.scale;
    let a = if d > 1000 {
        PI_2
    } else if d < -1000 {
        if !nx {
            let r = soft::div(env, y, x);
            return inexact(env, r);
        }
        PI
    } else {
        let t = yd.v.div(xd.v).scale(d);
        let a = atan_pos(t);
        if nx {
            PI.sub(a)
        } else {
            a
        }
    };
    let a = if ny { a.neg() } else { a };
    to_f80(env, XD { v: a, scale: 0 })
}

/// ln m for m in double-double range, m > 0, via 2 atanh((m−1)/(m+1)).
fn ln_dd(m: DD) -> DD {
    let s = m.sub(ONE).div(m.add(ONE));
    atanh2(s)
}

/// 2 atanh s.
fn atanh2(s: DD) -> DD {
    let s2 = s.mul(s);
    series(s, s2, |n| {
        DD::new((2 * n - 1) as f64).div(DD::new((2 * n + 1) as f64))
    })
    .scale(1)
}

/// log2 x for a finite positive x, as a double-double.
fn log2(x: F80) -> DD {
    let (_, xd) = split(x);
    let (mut m, mut e) = (xd.v, xd.scale);
    if m.hi > std::f64::consts::SQRT_2 {
        m = m.scale(-1);
        e += 1;
    }
    DD::new(e as f64).add(ln_dd(m).div(LN2))
}

/// y × l (l a double-double) rounded.
fn times(env: &mut Env, y: F80, l: XD) -> F80 {
    let (ny, yd) = split(y);
    let v = yd.v.mul(l.v);
    let v = if ny { v.neg() } else { v };
    to_f80(
        env,
        XD {
            v,
            scale: yd.scale + l.scale,
        },
    )
}

/// FYL2X: y × log2 x for finite nonzero y and finite positive x ≠ 1.
pub fn yl2x(env: &mut Env, y: F80, x: F80) -> F80 {
    times(
        env,
        y,
        XD {
            v: log2(x),
            scale: 0,
        },
    )
}

/// atan2 of special operands (a zero or an infinity; no NaNs), rounded.
pub fn atan2_special(env: &mut Env, y: F80, x: F80) -> F80 {
    use soft::Class::*;
    let (cy, cx) = (soft::classify(y), soft::classify(x));
    let (ny, nx) = (soft::sign(y), soft::sign(x));
    let quarter = PI_2.scale(-1);
    let a = match (cy, cx) {
        (Zero, _) if !nx => return soft::zero(ny),
        (Zero, _) => PI,
        (Inf, Inf) if !nx => quarter,
        (Inf, Inf) => PI.sub(quarter),
        (Inf, _) | (_, Zero) => PI_2,
        (_, Inf) if !nx => return soft::zero(ny),
        _ => PI,
    };
    to_f80(
        env,
        XD {
            v: if ny { a.neg() } else { a },
            scale: 0,
        },
    )
}

/// FYL2XP1: y × log2(1 + x) for finite nonzero x and y.
pub fn yl2xp1(env: &mut Env, y: F80, x: F80) -> F80 {
    let (nx, xd) = split(x);
    let l = if xd.scale < -900 {
        // log2(1 + x) = x / ln 2 below the last bit.
        let v = xd.v.div(LN2);
        XD {
            v: if nx { v.neg() } else { v },
            scale: xd.scale,
        }
    } else {
        let xv = xd.v.scale(xd.scale);
        let xv = if nx { xv.neg() } else { xv };
        let s = xv.div(DD::new(2.0).add(xv));
        XD {
            v: atanh2(s).div(LN2),
            scale: 0,
        }
    };
    times(env, y, l)
}

/// F2XM1: 2^x − 1 for finite nonzero x.
pub fn exp2m1(env: &mut Env, x: F80) -> F80 {
    let (nx, xd) = split(x);
    if xd.scale < -900 {
        let v = xd.v.mul(LN2);
        return to_f80(
            env,
            XD {
                v: if nx { v.neg() } else { v },
                scale: xd.scale,
            },
        );
    }
    let xv = xd.v.scale(xd.scale.min(1000));
    let t = if nx { xv.neg() } else { xv }.mul(LN2);
    let v = series(t, ONE, |n| recip((n + 1) as f64).mul(t));
    to_f80(env, XD { v, scale: 0 })
}
