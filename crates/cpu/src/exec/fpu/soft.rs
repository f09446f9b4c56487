//! Software 80-bit extended-precision arithmetic with x87 semantics.
//!
//! Values are the architectural [`F80`] encodings. Every operation takes an
//! [`Env`] (rounding control, precision control and exception masks from the
//! FCW) and accumulates into it the exception flags it raises and whether
//! the result was rounded up in magnitude (the x87's C1).
//!
//! The results follow the x87 rules rather than plain IEEE 754 where they
//! differ: unnormals, pseudo-NaNs and pseudo-infinities are invalid
//! operands; pseudo-denormals are read as denormals; NaNs propagate by the
//! larger significand; precision control rounds the significand of results
//! but keeps the 15-bit exponent range; tininess is detected after rounding;
//! a masked underflow is reported only when the tiny result is also inexact;
//! unmasked overflow and underflow deliver the result with its exponent
//! biased by ∓24576, as the hardware does for register destinations.

use crate::state::F80;

/// Invalid operation.
pub const IE: u16 = 1;
/// Denormal operand.
pub const DE: u16 = 2;
/// Zero divide.
pub const ZE: u16 = 4;
/// Overflow.
pub const OE: u16 = 8;
/// Underflow.
pub const UE: u16 = 0x10;
/// Precision (inexact).
pub const PE: u16 = 0x20;

/// Exponent bias adjustment of unmasked overflow/underflow results.
const SCALE: i32 = 24576;

/// The QNaN "real indefinite".
pub const INDEFINITE: F80 = F80 {
    mantissa: 0xc000_0000_0000_0000,
    sign_exp: 0xffff,
};

/// Rounding environment of one operation and the exceptions it raised.
#[derive(Clone, Copy, Debug)]
pub struct Env {
    /// Rounding control: 0 nearest, 1 down, 2 up, 3 toward zero.
    pub rc: u8,
    /// Significand precision of arithmetic results: 24, 53 or 64 bits.
    pub prec: u32,
    /// Exception masks (FCW bits 0–5; 1 = masked).
    pub masks: u16,
    /// Exceptions raised.
    pub flags: u16,
    /// The result was rounded up in magnitude (C1).
    pub c1: bool,
    /// Stack fault: Some(true) overflow, Some(false) underflow.
    pub stack: Option<bool>,
}

impl Env {
    /// The environment an arithmetic instruction sees under `fcw`.
    pub fn new(fcw: u16) -> Env {
        Env {
            rc: ((fcw >> 10) & 3) as u8,
            prec: match (fcw >> 8) & 3 {
                0 => 24,
                2 => 53,
                _ => 64,
            },
            masks: fcw & 0x3f,
            flags: 0,
            c1: false,
            stack: None,
        }
    }

    /// The same environment at full 64-bit precision (precision control
    /// applies only to FADD/FSUB/FMUL/FDIV/FSQRT and their variants).
    pub fn full(fcw: u16) -> Env {
        Env {
            prec: 64,
            ..Env::new(fcw)
        }
    }

    fn masked(&self, e: u16) -> bool {
        self.masks & e != 0
    }
}

/// Operand classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// ±0.
    Zero,
    /// Denormal or pseudo-denormal.
    Denormal,
    /// Normal finite.
    Normal,
    /// ±∞.
    Inf,
    /// Quiet NaN.
    QNaN,
    /// Signaling NaN.
    SNaN,
    /// Unnormal, pseudo-NaN or pseudo-infinity.
    Unsupported,
}

/// Classifies an 80-bit value.
pub fn classify(v: F80) -> Class {
    let e = v.sign_exp & 0x7fff;
    let m = v.mantissa;
    if e == 0 {
        if m == 0 {
            Class::Zero
        } else {
            Class::Denormal
        }
    } else if m >> 63 == 0 {
        Class::Unsupported
    } else if e == 0x7fff {
        if m << 1 == 0 {
            Class::Inf
        } else if m & (1 << 62) != 0 {
            Class::QNaN
        } else {
            Class::SNaN
        }
    } else {
        Class::Normal
    }
}

/// The sign bit.
pub fn sign(v: F80) -> bool {
    v.sign_exp & 0x8000 != 0
}

fn is_nan(c: Class) -> bool {
    matches!(c, Class::QNaN | Class::SNaN)
}

/// ±0.
pub fn zero(neg: bool) -> F80 {
    F80 {
        mantissa: 0,
        sign_exp: (neg as u16) << 15,
    }
}

/// ±∞.
pub fn inf(neg: bool) -> F80 {
    F80 {
        mantissa: 1 << 63,
        sign_exp: ((neg as u16) << 15) | 0x7fff,
    }
}

fn with_sign(v: F80, neg: bool) -> F80 {
    F80 {
        mantissa: v.mantissa,
        sign_exp: (v.sign_exp & 0x7fff) | ((neg as u16) << 15),
    }
}

fn quiet(v: F80) -> F80 {
    F80 {
        mantissa: v.mantissa | (1 << 62),
        sign_exp: v.sign_exp,
    }
}

/// A finite nonzero value: `sig` (bit 63 set) × 2^(exp − 63).
#[derive(Clone, Copy, Debug)]
struct Unp {
    neg: bool,
    exp: i32,
    sig: u64,
}

fn unpack(v: F80) -> Unp {
    let e = (v.sign_exp & 0x7fff) as i32;
    let mut m = v.mantissa;
    let exp = if e == 0 {
        let s = m.leading_zeros();
        m <<= s;
        -16382 - s as i32
    } else {
        e - 16383
    };
    Unp {
        neg: sign(v),
        exp,
        sig: m,
    }
}

/// Rounds `sig` (any u128) by dropping `d` low bits in mode `rc`: returns
/// the kept part (possibly carried), whether bits were lost, and whether
/// the magnitude was incremented.
fn rnd(sig: u128, d: u32, neg: bool, rc: u8) -> (u128, bool, bool) {
    if d == 0 {
        return (sig, false, false);
    }
    let (keep, above, half, odd, lost) = if d > 128 {
        (0, false, false, false, sig != 0)
    } else if d == 128 {
        let h = 1u128 << 127;
        (0, sig > h, sig == h, false, sig != 0)
    } else {
        let rem = sig & ((1u128 << d) - 1);
        let h = 1u128 << (d - 1);
        (sig >> d, rem > h, rem == h, (sig >> d) & 1 != 0, rem != 0)
    };
    let inc = lost
        && match rc {
            0 => above || (half && odd),
            1 => neg,
            2 => !neg,
            _ => false,
        };
    (keep + inc as u128, lost, inc)
}

/// A rounded finite or infinite result: `m` × 2^(e − 63), `m` left-aligned
/// (bit 63 set for normal numbers; clear for denormals, which have
/// `e` = the format's minimum exponent).
#[derive(Clone, Copy, Debug)]
struct Fin {
    neg: bool,
    e: i32,
    m: u64,
    inf: bool,
}

/// Rounds `sig` (bit 127 set) × 2^(e − 127) to `p` bits within the
/// exponent range [emin, emax], raising OE/UE/PE and setting C1.
fn round_pack(env: &mut Env, neg: bool, e: i32, sig: u128, p: u32, emin: i32, emax: i32) -> Fin {
    round_pack_to(env, neg, e, sig, p, emin, emax, true)
}

/// `round_pack`; `register` = false for memory formats, where an unmasked
/// overflow or underflow stores nothing (the caller discards the result)
/// instead of producing a bias-adjusted one.
#[allow(clippy::too_many_arguments)]
fn round_pack_to(
    env: &mut Env,
    neg: bool,
    e: i32,
    sig: u128,
    p: u32,
    emin: i32,
    emax: i32,
    register: bool,
) -> Fin {
    let rc = env.rc;
    let d0 = 128 - p;
    // Tininess after rounding: would the result, rounded with an unbounded
    // exponent, be below the smallest normal?
    let tiny = e < emin - 1 || (e == emin - 1 && (rnd(sig, d0, neg, rc).0 >> p) == 0);
    let mut e = e;
    let mut tiny = tiny;
    if tiny && !env.masked(UE) && !register {
        env.flags |= UE;
        return Fin {
            neg,
            e: emin,
            m: 0,
            inf: false,
        };
    }
    if tiny && !env.masked(UE) {
        env.flags |= UE;
        e += SCALE;
        if e < emin - 1 || (e == emin - 1 && (rnd(sig, d0, neg, rc).0 >> p) == 0) {
            // Still too small after the bias adjustment: a signed zero,
            // whatever the rounding mode.
            env.flags |= PE;
            env.c1 = false;
            return Fin {
                neg,
                e: emin,
                m: 0,
                inf: false,
            };
        }
        tiny = false;
    }
    if tiny {
        let d = d0 + (emin - e).min(200) as u32;
        let (keep, lost, up) = rnd(sig, d, neg, rc);
        if lost {
            env.flags |= UE | PE;
        }
        env.c1 = up;
        return Fin {
            neg,
            e: emin,
            m: (keep as u64) << (64 - p),
            inf: false,
        };
    }
    let (mut keep, lost, up) = rnd(sig, d0, neg, rc);
    if keep >> p != 0 {
        keep >>= 1;
        e += 1;
    }
    if lost {
        env.flags |= PE;
    }
    env.c1 = up;
    if e > emax {
        env.flags |= OE;
        if !env.masked(OE) && (e - SCALE > emax || !register) {
            // Still too large after the bias adjustment: infinity, whatever
            // the rounding mode.
            env.flags |= PE;
            env.c1 = true;
            return Fin {
                neg,
                e: 0,
                m: 0,
                inf: true,
            };
        } else if !env.masked(OE) {
            e -= SCALE;
        } else {
            env.flags |= PE;
            let to_inf = match rc {
                0 => true,
                1 => neg,
                2 => !neg,
                _ => false,
            };
            env.c1 = to_inf;
            if to_inf {
                return Fin {
                    neg,
                    e: 0,
                    m: 0,
                    inf: true,
                };
            }
            return Fin {
                neg,
                e: emax,
                m: (((1u128 << p) - 1) as u64) << (64 - p),
                inf: false,
            };
        }
    }
    Fin {
        neg,
        e,
        m: (keep as u64) << (64 - p),
        inf: false,
    }
}

fn fin_to_f80(f: Fin) -> F80 {
    if f.inf {
        return inf(f.neg);
    }
    let s = (f.neg as u16) << 15;
    if f.m >> 63 == 0 {
        F80 {
            mantissa: f.m,
            sign_exp: s,
        }
    } else {
        F80 {
            mantissa: f.m,
            sign_exp: s | ((f.e + 16383) as u16 & 0x7fff),
        }
    }
}

/// Rounds to an 80-bit register value at the environment's precision.
fn pack80(env: &mut Env, neg: bool, e: i32, sig: u128) -> F80 {
    let p = env.prec;
    fin_to_f80(round_pack(env, neg, e, sig, p, -16382, 16383))
}

fn nan_pick(a: F80, b: F80) -> F80 {
    // The NaN with the larger significand; on a tie the one with the
    // smaller sign/exponent field (positive first), as the x87 does.
    let (ma, mb) = (a.mantissa | (1 << 62), b.mantissa | (1 << 62));
    if ma > mb || (ma == mb && a.sign_exp <= b.sign_exp) {
        a
    } else {
        b
    }
}

/// NaN propagation for two operands of which at least one is a NaN.
fn propagate(env: &mut Env, a: F80, ca: Class, b: F80, cb: Class) -> F80 {
    if ca == Class::SNaN || cb == Class::SNaN {
        env.flags |= IE;
    }
    let r = match (is_nan(ca), is_nan(cb)) {
        (true, true) => {
            if ca == cb {
                nan_pick(a, b)
            } else if ca == Class::QNaN {
                a
            } else {
                b
            }
        }
        (true, false) => a,
        _ => b,
    };
    quiet(r)
}

/// Common screening of two operands: unsupported encodings and NaNs.
fn screen2(env: &mut Env, a: F80, b: F80) -> Result<(Class, Class), F80> {
    let (ca, cb) = (classify(a), classify(b));
    if ca == Class::Unsupported || cb == Class::Unsupported {
        env.flags |= IE;
        return Err(INDEFINITE);
    }
    if is_nan(ca) || is_nan(cb) {
        return Err(propagate(env, a, ca, b, cb));
    }
    if ca == Class::Denormal || cb == Class::Denormal {
        env.flags |= DE;
    }
    Ok((ca, cb))
}

fn screen1(env: &mut Env, a: F80) -> Result<Class, F80> {
    let ca = classify(a);
    match ca {
        Class::Unsupported => {
            env.flags |= IE;
            Err(INDEFINITE)
        }
        Class::SNaN => {
            env.flags |= IE;
            Err(quiet(a))
        }
        Class::QNaN => Err(a),
        Class::Denormal => {
            env.flags |= DE;
            Ok(ca)
        }
        _ => Ok(ca),
    }
}

fn invalid(env: &mut Env) -> F80 {
    env.flags |= IE;
    INDEFINITE
}

fn shr_jam(v: u128, d: u32) -> u128 {
    if d == 0 {
        v
    } else if d >= 128 {
        (v != 0) as u128
    } else {
        (v >> d) | ((v & ((1u128 << d) - 1)) != 0) as u128
    }
}

/// a + b, or a − b when `sub`.
pub fn add(env: &mut Env, a: F80, b: F80, sub: bool) -> F80 {
    let (ca, cb) = match screen2(env, a, b) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let na = sign(a);
    let nb = sign(b) ^ sub;
    match (ca, cb) {
        (Class::Inf, Class::Inf) => {
            if na != nb {
                return invalid(env);
            }
            return inf(na);
        }
        (Class::Inf, _) => return inf(na),
        (_, Class::Inf) => return inf(nb),
        (Class::Zero, Class::Zero) => {
            return zero(if na == nb { na } else { env.rc == 1 });
        }
        _ => {}
    }
    let x = (ca != Class::Zero).then(|| unpack(a));
    let y = (cb != Class::Zero).then(|| {
        let mut u = unpack(b);
        u.neg = nb;
        u
    });
    let (big, small) = match (x, y) {
        (Some(x), Some(y)) => {
            if x.exp > y.exp || (x.exp == y.exp && x.sig >= y.sig) {
                (x, Some(y))
            } else {
                (y, Some(x))
            }
        }
        (Some(x), None) => (x, None),
        (None, Some(y)) => (y, None),
        (None, None) => return zero(false),
    };
    let bs = (big.sig as u128) << 63;
    let mut sum = bs;
    if let Some(s) = small {
        let ss = shr_jam((s.sig as u128) << 63, (big.exp - s.exp) as u32);
        if s.neg == big.neg {
            sum += ss;
        } else {
            sum -= ss;
            if sum == 0 {
                return zero(env.rc == 1);
            }
        }
    }
    let lz = sum.leading_zeros();
    pack80(env, big.neg, big.exp + 1 - lz as i32, sum << lz)
}

/// a × b.
pub fn mul(env: &mut Env, a: F80, b: F80) -> F80 {
    let (ca, cb) = match screen2(env, a, b) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let neg = sign(a) ^ sign(b);
    match (ca, cb) {
        (Class::Inf, Class::Zero) | (Class::Zero, Class::Inf) => return invalid(env),
        (Class::Inf, _) | (_, Class::Inf) => return inf(neg),
        (Class::Zero, _) | (_, Class::Zero) => return zero(neg),
        _ => {}
    }
    let (x, y) = (unpack(a), unpack(b));
    let prod = x.sig as u128 * y.sig as u128;
    let lz = prod.leading_zeros();
    pack80(env, neg, x.exp + y.exp + 1 - lz as i32, prod << lz)
}

/// a ÷ b.
pub fn div(env: &mut Env, a: F80, b: F80) -> F80 {
    let (ca, cb) = match screen2(env, a, b) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let neg = sign(a) ^ sign(b);
    match (ca, cb) {
        (Class::Inf, Class::Inf) | (Class::Zero, Class::Zero) => return invalid(env),
        (Class::Inf, _) => return inf(neg),
        (_, Class::Inf) => return zero(neg),
        (Class::Zero, _) => return zero(neg),
        (_, Class::Zero) => {
            env.flags = (env.flags & !DE) | ZE;
            return inf(neg);
        }
        _ => {}
    }
    let (x, y) = (unpack(a), unpack(b));
    let shift = if x.sig >= y.sig { 63 } else { 64 };
    let n = (x.sig as u128) << shift;
    let q1 = n / y.sig as u128;
    let r1 = n % y.sig as u128;
    let n2 = r1 << 64;
    let q2 = n2 / y.sig as u128;
    let r2 = n2 % y.sig as u128;
    let sig = (q1 << 64) | q2 | (r2 != 0) as u128;
    pack80(env, neg, x.exp - y.exp + 63 - shift, sig)
}

/// Integer square root of `n` and its remainder.
fn isqrt(n: u128) -> (u64, u128) {
    let mut x = n;
    let mut res: u128 = 0;
    let mut bit: u128 = 1 << 126;
    while bit > n {
        bit >>= 2;
    }
    while bit != 0 {
        if x >= res + bit {
            x -= res + bit;
            res = (res >> 1) + bit;
        } else {
            res >>= 1;
        }
        bit >>= 2;
    }
    (res as u64, x)
}

/// √a.
pub fn sqrt(env: &mut Env, a: F80) -> F80 {
    let ca = match screen1(env, a) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match ca {
        Class::Zero => return a,
        _ if sign(a) => {
            env.flags &= !DE;
            return invalid(env);
        }
        Class::Inf => return a,
        _ => {}
    }
    let x = unpack(a);
    let odd = x.exp.rem_euclid(2) as u32;
    let n = (x.sig as u128) << (63 + odd);
    let (r, rem) = isqrt(n);
    let extra: u128 = if rem > r as u128 {
        (1 << 63) | 1
    } else {
        (rem != 0) as u128
    };
    pack80(env, false, x.exp.div_euclid(2), ((r as u128) << 64) | extra)
}

/// Result of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// a < b.
    Less,
    /// a = b.
    Equal,
    /// a > b.
    Greater,
    /// A NaN or unsupported operand.
    Unordered,
}

fn mag_key(v: F80) -> (u16, u64) {
    let e = v.sign_exp & 0x7fff;
    (e.max(1), v.mantissa)
}

/// Compares a with b. `quiet`: QNaN operands do not raise IE (FUCOM).
pub fn compare(env: &mut Env, a: F80, b: F80, quiet: bool) -> Cmp {
    let (ca, cb) = (classify(a), classify(b));
    if ca == Class::Unsupported || cb == Class::Unsupported {
        env.flags |= IE;
        return Cmp::Unordered;
    }
    if is_nan(ca) || is_nan(cb) {
        if !quiet || ca == Class::SNaN || cb == Class::SNaN {
            env.flags |= IE;
        }
        return Cmp::Unordered;
    }
    if ca == Class::Denormal || cb == Class::Denormal {
        env.flags |= DE;
    }
    if ca == Class::Zero && cb == Class::Zero {
        return Cmp::Equal;
    }
    let (sa, sb) = (sign(a) && ca != Class::Zero, sign(b) && cb != Class::Zero);
    if sa != sb {
        return if sa { Cmp::Less } else { Cmp::Greater };
    }
    let (ka, kb) = (mag_key(a), mag_key(b));
    let (ka, kb) = if ca == Class::Zero {
        ((1, 0), kb)
    } else if cb == Class::Zero {
        (ka, (1, 0))
    } else {
        (ka, kb)
    };
    let o = ka.cmp(&kb);
    let o = if sa { o.reverse() } else { o };
    match o {
        std::cmp::Ordering::Less => Cmp::Less,
        std::cmp::Ordering::Equal => Cmp::Equal,
        std::cmp::Ordering::Greater => Cmp::Greater,
    }
}

/// An exact value from an integer.
pub fn from_i64(v: i64) -> F80 {
    let neg = v < 0;
    let m = v.unsigned_abs();
    if m == 0 {
        return zero(false);
    }
    let lz = m.leading_zeros();
    F80 {
        mantissa: m << lz,
        sign_exp: ((neg as u16) << 15) | (16383 + 63 - lz) as u16,
    }
}

/// Rounds a finite value to an integer magnitude (u128) in mode `rc`.
/// Returns None when the magnitude is at least 2^64.
fn to_int_mag(env: &mut Env, x: Unp, rc: u8) -> Option<u64> {
    if x.exp >= 64 {
        return None;
    }
    let s = (x.sig as u128) << 64;
    let d = (127 - x.exp) as u32;
    let (keep, lost, up) = rnd(s, d, x.neg, rc);
    if keep >> 64 != 0 {
        return None;
    }
    if lost {
        env.flags |= PE;
    }
    env.c1 = up;
    Some(keep as u64)
}

/// Converts to a `bits`-bit signed integer (FIST/FISTP; FISTTP with
/// `truncate`). Out of range, NaN, ∞ → IE and the integer indefinite.
pub fn to_int(env: &mut Env, a: F80, bits: u32, truncate: bool) -> u64 {
    let indefinite = 1u64 << (bits - 1);
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let ca = classify(a);
    match ca {
        Class::Zero => return 0,
        Class::Normal | Class::Denormal => {}
        _ => {
            env.flags |= IE;
            return indefinite;
        }
    }
    let x = unpack(a);
    let rc = if truncate { 3 } else { env.rc };
    let mut e2 = *env;
    let mag = match to_int_mag(&mut e2, x, rc) {
        Some(m) => m,
        None => {
            env.flags |= IE;
            return indefinite;
        }
    };
    let limit = if x.neg { indefinite } else { indefinite - 1 };
    if mag > limit {
        env.flags |= IE;
        return indefinite;
    }
    env.flags |= e2.flags;
    env.c1 = e2.c1;
    let v = if x.neg { mag.wrapping_neg() } else { mag };
    v & mask
}

/// FRNDINT.
pub fn round_int(env: &mut Env, a: F80) -> F80 {
    let ca = match screen1(env, a) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if matches!(ca, Class::Zero | Class::Inf) {
        return a;
    }
    let x = unpack(a);
    if x.exp >= 63 {
        return a;
    }
    let rc = env.rc;
    match to_int_mag(env, x, rc) {
        Some(0) => zero(x.neg),
        Some(m) => with_sign(from_i64(m as i64), x.neg),
        None => a,
    }
}

fn nan_to_bits(a: F80, frac_bits: u32, exp_bits: u32) -> u64 {
    let s = sign(a) as u64;
    let frac = (a.mantissa << 1) >> (64 - frac_bits);
    let quiet = 1u64 << (frac_bits - 1);
    (s << (frac_bits + exp_bits)) | (((1u64 << exp_bits) - 1) << frac_bits) | frac | quiet
}

/// Converts to a binary32/binary64 encoding (`double`), rounding with RC.
pub fn to_float(env: &mut Env, a: F80, double: bool) -> u64 {
    let (p, ebits, bias) = if double {
        (53u32, 11u32, 1023)
    } else {
        (24, 8, 127)
    };
    let fbits = p - 1;
    let s = sign(a) as u64;
    let sbit = s << (fbits + ebits);
    let inf_bits = sbit | (((1u64 << ebits) - 1) << fbits);
    match classify(a) {
        Class::Zero => return sbit,
        Class::Inf => return inf_bits,
        Class::Unsupported => {
            env.flags |= IE;
            return nan_to_bits(INDEFINITE, fbits, ebits);
        }
        Class::SNaN => {
            env.flags |= IE;
            return nan_to_bits(a, fbits, ebits);
        }
        Class::QNaN => return nan_to_bits(a, fbits, ebits),
        _ => {}
    }
    let x = unpack(a);
    let f = round_pack_to(
        env,
        x.neg,
        x.exp,
        (x.sig as u128) << 64,
        p,
        1 - bias,
        bias,
        false,
    );
    if f.inf {
        return inf_bits;
    }
    let frac = (f.m >> (64 - p)) & ((1u64 << fbits) - 1);
    if f.m >> 63 == 0 {
        sbit | frac
    } else {
        let e = (f.e + bias) as u64 & ((1u64 << ebits) - 1);
        sbit | (e << fbits) | frac
    }
}

/// Converts a binary32/binary64 encoding to 80 bits exactly, as FLD does:
/// DE for denormal sources, IE (and quieting) for signaling NaNs.
pub fn from_float(env: &mut Env, bits: u64, double: bool) -> F80 {
    let (v, denormal) = from_float_raw(bits, double);
    match classify(v) {
        Class::SNaN => {
            env.flags |= IE;
            quiet(v)
        }
        _ => {
            if denormal {
                env.flags |= DE;
            }
            v
        }
    }
}

/// Converts a binary32/binary64 encoding to 80 bits exactly, keeping a
/// signaling NaN signaling; also says whether the source was denormal.
pub fn from_float_raw(bits: u64, double: bool) -> (F80, bool) {
    let (fbits, ebits, bias) = if double {
        (52u32, 11u32, 1023i32)
    } else {
        (23, 8, 127)
    };
    let neg = (bits >> (fbits + ebits)) & 1 != 0;
    let e = ((bits >> fbits) & ((1u64 << ebits) - 1)) as i32;
    let frac = bits & ((1u64 << fbits) - 1);
    let s = (neg as u16) << 15;
    if e == (1 << ebits) - 1 {
        if frac == 0 {
            return (inf(neg), false);
        }
        let m = (1u64 << 63) | (frac << (63 - fbits));
        return (
            F80 {
                mantissa: m,
                sign_exp: s | 0x7fff,
            },
            false,
        );
    }
    if e == 0 {
        if frac == 0 {
            return (zero(neg), false);
        }
        let lz = frac.leading_zeros();
        let m = frac << lz;
        // frac × 2^(1 − bias − fbits) = m × 2^(1 − bias − fbits − lz)
        let ex = 1 - bias - fbits as i32 - lz as i32 + 63;
        return (
            F80 {
                mantissa: m,
                sign_exp: s | (ex + 16383) as u16,
            },
            true,
        );
    }
    (
        F80 {
            mantissa: (1u64 << 63) | (frac << (63 - fbits)),
            sign_exp: s | (e - bias + 16383) as u16,
        },
        false,
    )
}

/// FSCALE: a × 2^trunc(b).
///
/// A zero scale returns the operand as it is on Intel processors
/// (`zero_scale_exact`); AMD processors round it like any other result, so
/// a denormal signals underflow when that exception is unmasked.
pub fn scale(env: &mut Env, a: F80, b: F80, zero_scale_exact: bool) -> F80 {
    let (ca, cb) = match screen2(env, a, b) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let nb = sign(b);
    match (ca, cb) {
        (Class::Zero, Class::Inf) if !nb => return invalid(env),
        (Class::Inf, Class::Inf) if nb => return invalid(env),
        (Class::Zero, _) | (Class::Inf, _) => return a,
        (_, Class::Inf) => return if nb { zero(sign(a)) } else { inf(sign(a)) },
        _ => {}
    }
    let n: i32 = if cb == Class::Zero {
        0
    } else {
        let y = unpack(b);
        let m = if y.exp < 0 {
            0
        } else if y.exp >= 30 {
            1 << 30
        } else {
            (y.sig >> (63 - y.exp)) as i32
        };
        if y.neg {
            -m
        } else {
            m
        }
    };
    if cb == Class::Zero && zero_scale_exact {
        return norm_pseudo(a);
    }
    let x = unpack(a);
    fin_to_f80(round_pack(
        env,
        x.neg,
        x.exp.saturating_add(n),
        (x.sig as u128) << 64,
        64,
        -16382,
        16383,
    ))
}

/// FXTRACT: (exponent, significand).
pub fn extract(env: &mut Env, a: F80) -> (F80, F80) {
    let ca = match screen1(env, a) {
        Ok(c) => c,
        Err(r) => return (r, r),
    };
    match ca {
        Class::Zero => {
            env.flags |= ZE;
            (inf(true), a)
        }
        Class::Inf => (inf(false), a),
        _ => {
            let x = unpack(a);
            let sig = F80 {
                mantissa: x.sig,
                sign_exp: ((x.neg as u16) << 15) | 0x3fff,
            };
            (from_i64(x.exp as i64), sig)
        }
    }
}

/// A pseudo-denormal operand passed through comes back normalized.
fn norm_pseudo(a: F80) -> F80 {
    if a.sign_exp & 0x7fff == 0 && a.mantissa >> 63 != 0 {
        F80 {
            sign_exp: a.sign_exp | 1,
            ..a
        }
    } else {
        a
    }
}

/// FPREM (`ieee` = false) and FPREM1. Returns the new ST0, the low three
/// quotient bits, and whether the reduction is complete (C2 = 0).
pub fn prem(env: &mut Env, a: F80, b: F80, ieee: bool) -> (F80, u64, bool) {
    let (ca, cb) = match screen2(env, a, b) {
        Ok(c) => c,
        Err(r) => return (r, 0, true),
    };
    match (ca, cb) {
        (Class::Inf, _) | (_, Class::Zero) => {
            env.flags &= !DE;
            return (invalid(env), 0, true);
        }
        (Class::Zero, _) | (_, Class::Inf) => return (norm_pseudo(a), 0, true),
        _ => {}
    }
    let x = unpack(a);
    let mut y = unpack(b);
    let d = x.exp - y.exp;
    let mut partial = false;
    if d >= 64 {
        let n = 32 + d % 32;
        y.exp = x.exp - n;
        partial = true;
    }
    let d = x.exp - y.exp;
    if d < -1 || (d < 0 && !ieee) {
        return (norm_pseudo(a), 0, true);
    }
    // Work in units of 2^(base − 63) with base = min(x.exp, y.exp − 1).
    let base = x.exp.min(y.exp - 1);
    let ai = (x.sig as u128) << (x.exp - base);
    let bi = (y.sig as u128) << (y.exp - base);
    let mut q = ai / bi;
    let mut r = ai % bi;
    let mut neg = x.neg;
    if partial {
        q = 0;
    }
    if ieee && !partial && (2 * r > bi || (2 * r == bi && q & 1 != 0)) {
        q += 1;
        r = bi - r;
        neg = !neg;
    }
    if r == 0 {
        return (zero(x.neg), q as u64, !partial);
    }
    let lz = r.leading_zeros();
    let f = round_pack(env, neg, base + 64 - lz as i32, r << lz, 64, -16382, 16383);
    (fin_to_f80(f), q as u64, !partial)
}

/// The rounding of the x87's built-in constants: the 64-bit truncated
/// significand rounds up in "nearest" when `nearest_up`, always in "up".
pub fn constant(rc: u8, sign_exp: u16, trunc: u64, nearest_up: bool) -> F80 {
    let up = match rc {
        0 => nearest_up,
        2 => true,
        _ => false,
    };
    F80 {
        mantissa: trunc + up as u64,
        sign_exp,
    }
}

/// Converts an f64 exactly.
pub fn from_f64(v: f64) -> F80 {
    let mut e = Env::full(0x37f);
    from_float(&mut e, v.to_bits(), true)
}

/// Tag of a value: 0 valid, 1 zero, 2 special.
pub fn tag_of(v: F80) -> u16 {
    match classify(v) {
        Class::Normal => 0,
        Class::Zero => 1,
        _ => 2,
    }
}

/// BCD → 80 bits (FBLD).
pub fn from_bcd(bytes: [u8; 10]) -> F80 {
    let mut v: u64 = 0;
    for i in (0..9).rev() {
        let b = bytes[i];
        v = v * 100 + ((b >> 4) as u64) * 10 + (b & 15) as u64;
    }
    let neg = bytes[9] & 0x80 != 0;
    with_sign(from_i64(v as i64), neg)
}

/// 80 bits → BCD (FBSTP), rounding with RC; None on IE.
pub fn to_bcd(env: &mut Env, a: F80) -> Option<[u8; 10]> {
    let ca = classify(a);
    let neg = sign(a);
    let mag = match ca {
        Class::Zero => 0,
        Class::Normal | Class::Denormal => {
            let x = unpack(a);
            let rc = env.rc;
            let mut e2 = *env;
            match to_int_mag(&mut e2, x, rc) {
                Some(m) if m <= 999_999_999_999_999_999 => {
                    env.flags |= e2.flags;
                    env.c1 = e2.c1;
                    m
                }
                _ => {
                    env.flags |= IE;
                    return None;
                }
            }
        }
        _ => {
            env.flags |= IE;
            return None;
        }
    };
    let mut out = [0u8; 10];
    let mut m = mag;
    for b in out.iter_mut().take(9) {
        let lo = (m % 10) as u8;
        m /= 10;
        let hi = (m % 10) as u8;
        m /= 10;
        *b = (hi << 4) | lo;
    }
    out[9] = if neg { 0x80 } else { 0 };
    Some(out)
}

/// Rounds `sig` (bit 127 set) × 2^(e − 127) to a 64-bit-significand value
/// with the environment's rounding control (for the transcendentals).
pub fn pack_full(env: &mut Env, neg: bool, e: i32, sig: u128) -> F80 {
    fin_to_f80(round_pack(env, neg, e, sig, 64, -16382, 16383))
}

/// Sign, unbiased exponent and normalized significand (bit 63 set) of a
/// finite nonzero value.
pub fn parts(a: F80) -> (bool, i32, u64) {
    let x = unpack(a);
    (x.neg, x.exp, x.sig)
}
