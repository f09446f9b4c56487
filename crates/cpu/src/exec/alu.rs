//! Integer arithmetic, logic, shifts, bit operations, BCD, data movement.

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::decode::{DecodedInsn, OpK};
use crate::exception::{Exc, Res, Vector};
use crate::exec::KM;
use crate::flags::{parity, sign_bit, size_mask, FlagOp};
use crate::state::flags::*;
use crate::vendor::Vendor;

type R = Res;

#[inline(always)]
fn sx(v: u64, size: u8) -> i64 {
    let sh = 64 - size as u32 * 8;
    ((v << sh) as i64) >> sh
}

macro_rules! arith {
    ($name:ident, $op:expr, $write:expr, $f:expr) => {
        pub(crate) fn $name<const A: u8, const B: u8>(
            c: &mut Cpu,
            d: &DecodedInsn,
            bus: &mut dyn Bus,
        ) -> R {
            let size = d.osize;
            if A == KM {
                // Read-modify-write: one segment check (as a write when the
                // result is stored) and one address computation.
                let ea = c.ea(d);
                let lin = c.seg_lin(d.mseg as usize, ea, size, $write)?;
                let a = if $write {
                    c.read_lin_rmw(bus, lin, size)?
                } else {
                    c.read_lin(bus, lin, size)?
                };
                let b = c.rdk::<B>(bus, d, 1)? & size_mask(size);
                #[allow(clippy::redundant_closure_call)]
                let (res, cin) = ($f)(c, a, b);
                let res = res & size_mask(size);
                if $write {
                    c.write_lin(bus, lin, size, res)?;
                }
                c.set_lazy($op, size, res, a, b, cin);
                return Ok(());
            }
            let a = c.rdk::<A>(bus, d, 0)?;
            let b = c.rdk::<B>(bus, d, 1)? & size_mask(size);
            #[allow(clippy::redundant_closure_call)]
            let (res, cin) = ($f)(c, a, b);
            let res = res & size_mask(size);
            if $write {
                c.wrk::<A>(bus, d, 0, res)?;
            }
            c.set_lazy($op, size, res, a, b, cin);
            Ok(())
        }
    };
}

arith!(add, FlagOp::Add, true, |_c: &mut Cpu, a: u64, b: u64| (
    a.wrapping_add(b),
    false
));
arith!(sub, FlagOp::Sub, true, |_c: &mut Cpu, a: u64, b: u64| (
    a.wrapping_sub(b),
    false
));
arith!(cmp, FlagOp::Sub, false, |_c: &mut Cpu, a: u64, b: u64| (
    a.wrapping_sub(b),
    false
));
arith!(and, FlagOp::Logic, true, |_c: &mut Cpu, a: u64, b: u64| (
    a & b,
    false
));
arith!(or, FlagOp::Logic, true, |_c: &mut Cpu, a: u64, b: u64| (
    a | b,
    false
));
arith!(xor, FlagOp::Logic, true, |_c: &mut Cpu, a: u64, b: u64| (
    a ^ b,
    false
));
arith!(
    test,
    FlagOp::Logic,
    false,
    |_c: &mut Cpu, a: u64, b: u64| (a & b, false)
);
arith!(adc, FlagOp::Adc, true, |c: &mut Cpu, a: u64, b: u64| {
    let cin = c.cf();
    (a.wrapping_add(b).wrapping_add(cin as u64), cin)
});
arith!(sbb, FlagOp::Sbb, true, |c: &mut Cpu, a: u64, b: u64| {
    let cin = c.cf();
    (a.wrapping_sub(b).wrapping_sub(cin as u64), cin)
});

pub(crate) fn inc<const A: u8>(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let a = c.rdk::<A>(bus, d, 0)?;
    let res = a.wrapping_add(1) & size_mask(size);
    c.wrk::<A>(bus, d, 0, res)?;
    let cf = c.cf();
    c.set_lazy(FlagOp::Inc, size, res, a, 1, cf);
    Ok(())
}

pub(crate) fn dec<const A: u8>(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let a = c.rdk::<A>(bus, d, 0)?;
    let res = a.wrapping_sub(1) & size_mask(size);
    c.wrk::<A>(bus, d, 0, res)?;
    let cf = c.cf();
    c.set_lazy(FlagOp::Dec, size, res, a, 1, cf);
    Ok(())
}

pub(crate) fn neg(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let b = c.rd(bus, d, 0)?;
    let res = 0u64.wrapping_sub(b) & size_mask(size);
    c.wr(bus, d, 0, res)?;
    c.set_lazy(FlagOp::Sub, size, res, 0, b, false);
    Ok(())
}

pub(crate) fn not(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let a = c.rd(bus, d, 0)?;
    c.wr(bus, d, 0, !a & size_mask(d.osize))
}

pub(crate) fn mov<const A: u8, const B: u8>(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let v = c.rdk::<B>(bus, d, 1)?;
    c.wrk::<A>(bus, d, 0, v)
}

pub(crate) fn movzx(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let v = c.rd(bus, d, 1)?;
    c.wr(bus, d, 0, v)
}

pub(crate) fn movsx(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let v = c.rd(bus, d, 1)?;
    let v = sx(v, d.ops[1].size) as u64 & size_mask(d.osize);
    c.wr(bus, d, 0, v)
}

pub(crate) fn lea(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let ea = c.ea(d) as u64;
    c.reg_set(d.ops[0], ea);
    Ok(())
}

/// MFENCE: a host fence, for CPUs on other host threads (the store
/// buffering the host allows is what x86 allows; the fence forbids it).
/// LFENCE and SFENCE order nothing write-back memory needs.
pub(crate) fn mfence(_c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

pub(crate) fn xchg(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let a = c.rd(bus, d, 0)?;
    let b = c.rd(bus, d, 1)?;
    // Memory first, so a fault leaves the registers untouched.
    if d.ops[0].kind == OpK::Mem {
        c.wr(bus, d, 0, b)?;
        c.wr(bus, d, 1, a)
    } else {
        c.wr(bus, d, 1, a)?;
        c.wr(bus, d, 0, b)
    }
}

pub(crate) fn xadd(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let a = c.rd(bus, d, 0)?;
    let b = c.rd(bus, d, 1)?;
    let res = a.wrapping_add(b) & size_mask(size);
    c.wr(bus, d, 0, res)?;
    c.wr(bus, d, 1, a)?;
    if d.ops[0].kind == OpK::Reg && d.ops[0].reg == d.ops[1].reg && d.ops[0].hi == d.ops[1].hi {
        c.wr(bus, d, 0, res)?;
    }
    c.set_lazy(FlagOp::Add, size, res, a, b, false);
    Ok(())
}

pub(crate) fn cmpxchg(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let dst = c.rd(bus, d, 0)?;
    let acc = c.gr(0, size);
    let res = acc.wrapping_sub(dst) & size_mask(size);
    if acc == dst {
        let src = c.rd(bus, d, 1)?;
        c.wr(bus, d, 0, src)?;
    } else {
        // The destination is always written (with its own value) on a miss.
        c.wr(bus, d, 0, dst)?;
        c.sr(0, size, dst);
    }
    c.set_lazy(FlagOp::Sub, size, res, acc, dst, false);
    Ok(())
}

pub(crate) fn cmpxchg8b(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if d.ops[0].kind != OpK::Mem {
        return Err(Exc::ud());
    }
    let ea = c.ea(d);
    let lo = c.read_mem_rmw(bus, d.mseg as usize, ea, 4)?;
    let hi = c.read_mem_rmw(bus, d.mseg as usize, ea.wrapping_add(4), 4)?;
    let mem = lo | (hi << 32);
    let edx_eax = c.gr(0, 4) | (c.gr(2, 4) << 32);
    c.sync_flags();
    if mem == edx_eax {
        let ecx_ebx = c.gr(3, 4) | (c.gr(1, 4) << 32);
        c.write_mem(bus, d.mseg as usize, ea, 4, ecx_ebx & 0xffff_ffff)?;
        c.write_mem(bus, d.mseg as usize, ea.wrapping_add(4), 4, ecx_ebx >> 32)?;
        c.st.rflags |= ZF as u64;
    } else {
        c.write_mem(bus, d.mseg as usize, ea, 4, lo)?;
        c.write_mem(bus, d.mseg as usize, ea.wrapping_add(4), 4, hi)?;
        c.sr(0, 4, lo);
        c.sr(2, 4, hi);
        c.st.rflags &= !(ZF as u64);
    }
    Ok(())
}

pub(crate) fn bswap(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let o = d.ops[0];
    let v = c.reg_get(o);
    let r = if o.size == 4 {
        (v as u32).swap_bytes() as u64
    } else {
        // BSWAP of a 16-bit register is undefined; hardware gives zero.
        0
    };
    c.reg_set(o, r);
    Ok(())
}

pub(crate) fn cbw(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let half = size / 2;
    let v = sx(c.gr(0, half), half) as u64;
    c.sr(0, size, v);
    Ok(())
}

pub(crate) fn cwd(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let v = if c.gr(0, size) & sign_bit(size) != 0 {
        size_mask(size)
    } else {
        0
    };
    c.sr(2, size, v);
    Ok(())
}

/// Shift/rotate count, masked to 5 bits as on every IA-32 processor since
/// the 80286.
fn shift_count(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> Res<u32> {
    let n = if d.ops[1].kind == OpK::None {
        1
    } else {
        c.rd(bus, d, 1)?
    };
    Ok((n & 0x1f) as u32)
}

/// Common flag setting for shifts: SF/ZF/PF from the result, CF and OF
/// given, AF undefined: Intel processors clear it, AMD processors set it.
fn shift_flags(c: &mut Cpu, size: u8, res: u64, cf: bool, of: bool) {
    let mut f = if c.vendor() == Vendor::Amd { AF } else { 0 };
    if cf {
        f |= CF;
    }
    if of {
        f |= OF;
    }
    if res & size_mask(size) == 0 {
        f |= ZF;
    }
    if res & sign_bit(size) != 0 {
        f |= SF;
    }
    if parity(res) {
        f |= PF;
    }
    c.set_arith_flags(f);
}

/// OF of a shift or rotate to the left. For counts above 1 the SDM leaves
/// it undefined; Intel processors give the OF of the first 1-bit step,
/// MSB(dest) XOR the bit below it, which for a count of 1 is the defined
/// value.
fn of_left(a: u64, size: u8) -> bool {
    let bits = size as u32 * 8;
    ((a >> (bits - 1)) ^ (a >> (bits - 2))) & 1 != 0
}

/// MSB(result) XOR CF: how AMD processors compute OF after every shift or
/// rotate to the left, whatever the count (for a count of 1 it is the
/// defined value).
fn of_msb_cf(res: u64, size: u8, cf: bool) -> bool {
    (res & sign_bit(size) != 0) != cf
}

/// The two most significant bits of the result differ: how AMD processors
/// compute OF after every shift or rotate to the right (for a count of 1
/// it is the defined value).
fn of_top2(res: u64, size: u8) -> bool {
    let bits = size as u32 * 8;
    ((res >> (bits - 1)) ^ (res >> (bits - 2))) & 1 != 0
}

pub(crate) fn shl(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let n = shift_count(c, d, bus)?;
    let a = c.rd(bus, d, 0)?;
    if n == 0 {
        return Ok(());
    }
    let res = if n >= 64 {
        0
    } else {
        (a << n) & size_mask(size)
    };
    let cf = n <= bits && (a >> (bits - n)) & 1 != 0;
    c.wr(bus, d, 0, res)?;
    let of = match c.vendor() {
        Vendor::Intel => of_left(a, size),
        Vendor::Amd => of_msb_cf(res, size, cf),
    };
    shift_flags(c, size, res, cf, of);
    Ok(())
}

pub(crate) fn shr(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let n = shift_count(c, d, bus)?;
    let a = c.rd(bus, d, 0)?;
    if n == 0 {
        return Ok(());
    }
    let res = a >> n;
    let cf = (a >> (n - 1)) & 1 != 0;
    c.wr(bus, d, 0, res)?;
    let of = match c.vendor() {
        Vendor::Intel => a & sign_bit(size) != 0,
        Vendor::Amd => of_top2(res, size),
    };
    shift_flags(c, size, res, cf, of);
    Ok(())
}

pub(crate) fn sar(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let n = shift_count(c, d, bus)?;
    let a = c.rd(bus, d, 0)?;
    if n == 0 {
        return Ok(());
    }
    let s = sx(a, size);
    let res = (s >> n.min(63)) as u64 & size_mask(size);
    let cf = (s >> (n - 1).min(63)) & 1 != 0;
    c.wr(bus, d, 0, res)?;
    shift_flags(c, size, res, cf, false);
    Ok(())
}

/// Rotates change only CF and OF.
fn rot_flags(c: &mut Cpu, cf: bool, of: bool) {
    c.sync_flags();
    let mut f = c.st.rflags as u32 & !(CF | OF);
    if cf {
        f |= CF;
    }
    if of {
        f |= OF;
    }
    c.st.rflags = (c.st.rflags & !0xffff_ffff) | f as u64;
}

/// OF after ROL/ROR on Intel processors: `first_step` (the OF of the first
/// 1-bit step) for a count of 1, for counts in CL and for memory operands;
/// for a register rotated by an immediate count above 1 (OF undefined)
/// they leave OF unchanged. AMD processors compute `amd` (see `of_msb_cf`
/// and `of_top2`) for every count.
fn rot_of(c: &Cpu, d: &DecodedInsn, n: u32, first_step: bool, amd: bool) -> bool {
    if c.vendor() == Vendor::Amd {
        amd
    } else if n != 1 && d.ops[1].kind == OpK::Imm && d.ops[0].kind == OpK::Reg {
        c.of()
    } else {
        first_step
    }
}

pub(crate) fn rol(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let n = shift_count(c, d, bus)?;
    let a = c.rd(bus, d, 0)?;
    if n == 0 {
        return Ok(());
    }
    let r = n % bits;
    let res = if r == 0 {
        a
    } else {
        ((a << r) | (a >> (bits - r))) & size_mask(size)
    };
    c.wr(bus, d, 0, res)?;
    let cf = res & 1 != 0;
    let of = rot_of(c, d, n, of_left(a, size), of_msb_cf(res, size, cf));
    rot_flags(c, cf, of);
    Ok(())
}

pub(crate) fn ror(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let n = shift_count(c, d, bus)?;
    let a = c.rd(bus, d, 0)?;
    if n == 0 {
        return Ok(());
    }
    let r = n % bits;
    let res = if r == 0 {
        a
    } else {
        ((a >> r) | (a << (bits - r))) & size_mask(size)
    };
    c.wr(bus, d, 0, res)?;
    let cf = res & sign_bit(size) != 0;
    // OF of the first 1-bit step (see `of_left`): MSB XOR LSB of the source.
    let of = rot_of(
        c,
        d,
        n,
        ((a >> (bits - 1)) ^ a) & 1 != 0,
        of_top2(res, size),
    );
    rot_flags(c, cf, of);
    Ok(())
}

pub(crate) fn rcl(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let count = shift_count(c, d, bus)?;
    let n = count % (bits + 1);
    let a = c.rd(bus, d, 0)?;
    if n == 0 {
        // Count masked to zero-modulo: Intel processors change nothing;
        // AMD processors still compute OF (for a count that was not zero).
        if count != 0 && c.vendor() == Vendor::Amd {
            let cf = c.cf();
            c.wr(bus, d, 0, a)?;
            rot_flags(c, cf, of_msb_cf(a, size, cf));
        }
        return Ok(());
    }
    let mut v = a as u128 | ((c.cf() as u128) << bits);
    let w = bits + 1;
    v = ((v << n) | (v >> (w - n))) & ((1u128 << w) - 1);
    let res = (v as u64) & size_mask(size);
    let cf = (v >> bits) & 1 != 0;
    c.wr(bus, d, 0, res)?;
    let of = match c.vendor() {
        Vendor::Intel => of_left(a, size),
        Vendor::Amd => of_msb_cf(res, size, cf),
    };
    rot_flags(c, cf, of);
    Ok(())
}

pub(crate) fn rcr(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let count = shift_count(c, d, bus)?;
    let n = count % (bits + 1);
    let a = c.rd(bus, d, 0)?;
    if n == 0 {
        // As for RCL.
        if count != 0 && c.vendor() == Vendor::Amd {
            let cf = c.cf();
            c.wr(bus, d, 0, a)?;
            rot_flags(c, cf, of_top2(a, size));
        }
        return Ok(());
    }
    let cin = c.cf();
    let mut v = a as u128 | ((cin as u128) << bits);
    let w = bits + 1;
    v = ((v >> n) | (v << (w - n))) & ((1u128 << w) - 1);
    let res = (v as u64) & size_mask(size);
    let cf = (v >> bits) & 1 != 0;
    c.wr(bus, d, 0, res)?;
    // Intel: OF of the first 1-bit step (see `of_left`), MSB of the source
    // XOR CF.
    let of = match c.vendor() {
        Vendor::Intel => ((a >> (bits - 1)) & 1 != 0) != cin,
        Vendor::Amd => of_top2(res, size),
    };
    rot_flags(c, cf, of);
    Ok(())
}

fn double_shift(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, left: bool) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let n = (c.rd(bus, d, 2)? & 0x1f) as u32;
    let a = c.rd(bus, d, 0)?;
    let b = c.rd(bus, d, 1)?;
    if n == 0 {
        return Ok(());
    }
    let amd = c.vendor() == Vendor::Amd;
    // With a 16-bit operand and a count above 16 the result is undefined.
    // Intel processors shift through a concatenation of dst:src:dst; AMD
    // processors shift src:src by count − 16 and clear CF.
    let (res, cf) = if amd && n > bits {
        let ss = (b << bits) | b;
        let r = if left {
            (ss << (n - bits)) >> bits
        } else {
            ss >> (n - bits)
        };
        (r & size_mask(size), false)
    } else if left {
        let wide: u128 = ((a as u128) << (2 * bits)) | ((b as u128) << bits) | a as u128;
        let r = (wide << n) >> (2 * bits);
        let cf = ((wide << (n - 1)) >> (3 * bits - 1)) & 1 != 0;
        (r as u64 & size_mask(size), cf)
    } else {
        let cat: u128 = a as u128 | ((b as u128) << bits) | ((a as u128) << (2 * bits));
        (
            ((cat >> n) as u64) & size_mask(size),
            (cat >> (n - 1)) & 1 != 0,
        )
    };
    c.wr(bus, d, 0, res)?;
    // OF: Intel processors give the OF of the first 1-bit step (undefined
    // above 1); AMD processors the left and right rules of `of_msb_cf` and
    // `of_top2`, except a 16-bit SHLD by 16 or more, whose OF is CF.
    let of = match (amd, left) {
        (false, true) => of_left(a, size),
        (false, false) => ((a >> (bits - 1)) ^ b) & 1 != 0,
        (true, true) if n >= bits => cf,
        (true, true) => of_msb_cf(res, size, cf),
        (true, false) => of_top2(res, size),
    };
    shift_flags(c, size, res, cf, of);
    Ok(())
}

pub(crate) fn shld(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    double_shift(c, d, bus, true)
}

pub(crate) fn shrd(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    double_shift(c, d, bus, false)
}

/// MUL/IMUL flags: CF = OF = "upper half significant". SF/ZF/AF/PF are
/// undefined by the SDM; Intel processors set SF and PF from the low half
/// and clear ZF and AF, AMD processors leave them unchanged.
fn mul_flags(c: &mut Cpu, size: u8, lo: u64, of: bool) {
    if c.vendor() == Vendor::Amd {
        c.sync_flags();
        let f = c.st.rflags as u32 & !(CF | OF);
        c.set_arith_flags(if of { f | CF | OF } else { f });
        return;
    }
    let mut f = 0;
    if of {
        f |= CF | OF;
    }
    if lo & sign_bit(size) != 0 {
        f |= SF;
    }
    if parity(lo) {
        f |= PF;
    }
    c.set_arith_flags(f);
}

pub(crate) fn mul(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let b = c.rd(bus, d, 0)?;
    let a = c.gr(0, size);
    let p = (a as u128) * (b as u128);
    let bits = size as u32 * 8;
    let lo = p as u64 & size_mask(size);
    let hi = (p >> bits) as u64 & size_mask(size);
    if size == 1 {
        c.sr(0, 2, (p as u64) & 0xffff);
    } else {
        c.sr(0, size, lo);
        c.sr(2, size, hi);
    }
    mul_flags(c, size, lo, hi != 0);
    Ok(())
}

pub(crate) fn imul(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let nops = d.insn.op_count();
    if nops == 1 {
        let b = sx(c.rd(bus, d, 0)?, size) as i128;
        let a = sx(c.gr(0, size), size) as i128;
        let p = a * b;
        let lo = p as u64 & size_mask(size);
        let hi = (p >> bits) as u64 & size_mask(size);
        if size == 1 {
            c.sr(0, 2, (p as u64) & 0xffff);
        } else {
            c.sr(0, size, lo);
            c.sr(2, size, hi);
        }
        let of = p != sx(lo, size) as i128;
        mul_flags(c, size, lo, of);
    } else {
        let (x, y) = if nops == 2 {
            (c.rd(bus, d, 0)?, c.rd(bus, d, 1)?)
        } else {
            (c.rd(bus, d, 1)?, c.rd(bus, d, 2)?)
        };
        let p = sx(x, size) as i128 * sx(y, size) as i128;
        let lo = p as u64 & size_mask(size);
        c.wr(bus, d, 0, lo)?;
        let of = p != sx(lo, size) as i128;
        mul_flags(c, size, lo, of);
    }
    Ok(())
}

pub(crate) fn div(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let b = c.rd(bus, d, 0)? as u128;
    if b == 0 {
        return Err(Exc::fault(Vector::DE));
    }
    let a: u128 = if size == 1 {
        c.gr(0, 2) as u128
    } else {
        c.gr(0, size) as u128 | ((c.gr(2, size) as u128) << bits)
    };
    let q = a / b;
    let r = a % b;
    if q > size_mask(size) as u128 {
        return Err(Exc::fault(Vector::DE));
    }
    if size == 1 {
        c.sr(0, 2, (q as u64) | ((r as u64) << 8));
    } else {
        c.sr(0, size, q as u64);
        c.sr(2, size, r as u64);
    }
    div_flags(c);
    Ok(())
}

/// DIV/IDIV leave all six flags undefined: Intel processors leave them
/// unchanged; AMD processors set AF, clear SF, ZF and PF and keep CF and OF.
fn div_flags(c: &mut Cpu) {
    if c.vendor() == Vendor::Amd {
        c.sync_flags();
        let f = c.st.rflags as u32 & (CF | OF);
        c.set_arith_flags(f | AF);
    }
}

pub(crate) fn idiv(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.osize;
    let bits = size as u32 * 8;
    let b = sx(c.rd(bus, d, 0)?, size) as i128;
    if b == 0 {
        return Err(Exc::fault(Vector::DE));
    }
    let a: i128 = if size == 1 {
        sx(c.gr(0, 2), 2) as i128
    } else {
        let raw = c.gr(0, size) as u128 | ((c.gr(2, size) as u128) << bits);
        ((raw << (128 - 2 * bits)) as i128) >> (128 - 2 * bits)
    };
    let q = a / b;
    let r = a % b;
    let max = (1i128 << (bits - 1)) - 1;
    let min = -(1i128 << (bits - 1));
    if q > max || q < min {
        return Err(Exc::fault(Vector::DE));
    }
    let m = size_mask(size);
    if size == 1 {
        c.sr(0, 2, ((q as u64) & 0xff) | (((r as u64) & 0xff) << 8));
    } else {
        c.sr(0, size, q as u64 & m);
        c.sr(2, size, r as u64 & m);
    }
    div_flags(c);
    Ok(())
}

fn szp(v: u8) -> u32 {
    let mut f = 0;
    if v == 0 {
        f |= ZF;
    }
    if v & 0x80 != 0 {
        f |= SF;
    }
    if parity(v as u64) {
        f |= PF;
    }
    f
}

/// DAA (`add`) and DAS: adjust AL after a packed-BCD addition or
/// subtraction (SDM pseudo-code). OF is undefined: Intel processors clear
/// it; AMD processors set it as for the signed overflow of the adjustment
/// (AL went from positive to negative for DAA, the reverse for DAS).
fn decimal_adjust(c: &mut Cpu, add: bool) -> R {
    let old_al = c.gr(0, 1) as u8;
    let old_cf = c.cf();
    let af_in = c.eflags() & AF != 0;
    let mut al = old_al;
    let mut cf = false;
    let mut af = false;
    if old_al & 0xf > 9 || af_in {
        if add {
            al = al.wrapping_add(6);
            cf = old_cf || old_al > 0xf9;
        } else {
            al = al.wrapping_sub(6);
            cf = old_cf || old_al < 6;
        }
        af = true;
    }
    if old_al > 0x99 || old_cf {
        al = if add {
            al.wrapping_add(0x60)
        } else {
            al.wrapping_sub(0x60)
        };
        cf = true;
    }
    c.sr(0, 1, al as u64);
    let mut f = szp(al);
    if cf {
        f |= CF;
    }
    if af {
        f |= AF;
    }
    if c.vendor() == Vendor::Amd {
        let flipped = if add { !old_al & al } else { old_al & !al };
        if flipped & 0x80 != 0 {
            f |= OF;
        }
    }
    c.set_arith_flags(f);
    Ok(())
}

pub(crate) fn daa(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    decimal_adjust(c, true)
}

pub(crate) fn das(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    decimal_adjust(c, false)
}

fn aaa_aas(c: &mut Cpu, add: bool) -> R {
    let ax = c.gr(0, 2) as u16;
    let al = ax as u8;
    let af_in = c.eflags() & AF != 0;
    let (res, adj) = if al & 0xf > 9 || af_in {
        let r = if add {
            ax.wrapping_add(0x106)
        } else {
            // AX ← AX − 6; AH ← AH − 1 (SDM): the borrow reaches AH.
            ax.wrapping_sub(0x106)
        };
        (r, true)
    } else {
        (ax, false)
    };
    let wide = res;
    let res = (res & 0xff0f) as u64;
    c.sr(0, 2, res);
    // SF/ZF/PF/OF are undefined. Intel processors set SF/ZF/PF from the
    // final AL and clear OF; AMD processors set all four as for the 16-bit
    // AX ± 0x106 (or AX + 0) before the high nibble of AL is cleared.
    let mut f = if c.vendor() == Vendor::Amd {
        let b: u16 = if adj { 0x106 } else { 0 };
        let ovf = if add {
            (ax ^ wide) & (b ^ wide)
        } else {
            (ax ^ b) & (ax ^ wide)
        };
        let mut f = szp(wide as u8) & PF;
        if wide == 0 {
            f |= ZF;
        }
        if wide & 0x8000 != 0 {
            f |= SF;
        }
        if ovf & 0x8000 != 0 {
            f |= OF;
        }
        f
    } else {
        szp(res as u8)
    };
    if adj {
        f |= CF | AF;
    }
    c.set_arith_flags(f);
    Ok(())
}

pub(crate) fn aaa(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    aaa_aas(c, true)
}

pub(crate) fn aas(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    aaa_aas(c, false)
}

pub(crate) fn aam(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let base = (d.imm & 0xff) as u8;
    if base == 0 {
        return Err(Exc::fault(Vector::DE));
    }
    let al = c.gr(0, 1) as u8;
    let r = al % base;
    c.sr(0, 2, (((al / base) as u64) << 8) | r as u64);
    c.set_arith_flags(szp(r));
    Ok(())
}

pub(crate) fn aad(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let base = (d.imm & 0xff) as u8;
    let ax = c.gr(0, 2);
    let t = ((ax >> 8) as u8).wrapping_mul(base);
    let al = (ax as u8).wrapping_add(t);
    c.sr(0, 2, al as u64);
    // OF/AF/CF are undefined; Intel processors set all six flags as for
    // the byte addition AL + AH × imm8.
    c.set_lazy(FlagOp::Add, 1, al as u64, ax & 0xff, t as u64, false);
    Ok(())
}

/// Operand and bit offset for BT/BTS/BTR/BTC: with a register bit offset
/// and a memory operand the offset addresses bits beyond the operand.
fn bit_operand(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> Res<(u64, u32, Option<u32>)> {
    let size = d.osize;
    let bits = size as u32 * 8;
    let off = c.rd(bus, d, 1)?;
    if d.ops[0].kind == OpK::Mem && d.ops[1].kind == OpK::Reg {
        let soff = sx(off, size);
        let byte_off = (soff >> 3) & !((size as i64) - 1);
        let ea = (c.ea(d) as i64).wrapping_add(byte_off) as u32;
        let ea = if d.asize == 2 { ea & 0xffff } else { ea };
        let v = if d.rmw {
            c.read_mem_rmw(bus, d.mseg as usize, ea, size)?
        } else {
            c.read_mem(bus, d.mseg as usize, ea, size)?
        };
        Ok((v, (off as u32) & (bits - 1), Some(ea)))
    } else {
        let v = c.rd(bus, d, 0)?;
        Ok((v, (off as u32) & (bits - 1), None))
    }
}

fn bt_common(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, op: u8) -> R {
    let (v, bit, addr) = bit_operand(c, d, bus)?;
    let cf = (v >> bit) & 1 != 0;
    let nv = match op {
        1 => v | (1 << bit),
        2 => v & !(1 << bit),
        3 => v ^ (1 << bit),
        _ => v,
    };
    if op != 0 {
        match addr {
            Some(ea) => c.write_mem(bus, d.mseg as usize, ea, d.osize, nv)?,
            None => c.wr(bus, d, 0, nv)?,
        }
    }
    c.sync_flags();
    let f = c.st.rflags as u32 & !CF;
    c.set_arith_flags(if cf { f | CF } else { f });
    Ok(())
}

pub(crate) fn bt(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    bt_common(c, d, bus, 0)
}
pub(crate) fn bts(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    bt_common(c, d, bus, 1)
}
pub(crate) fn btr(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    bt_common(c, d, bus, 2)
}
pub(crate) fn btc(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    bt_common(c, d, bus, 3)
}

fn bsx(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, forward: bool) -> R {
    let v = c.rd(bus, d, 1)?;
    if c.bitscan_keeps_flags() {
        // Zen 3: only ZF is written.
        if v != 0 {
            let idx = if forward {
                v.trailing_zeros()
            } else {
                63 - v.leading_zeros()
            };
            c.wr(bus, d, 0, idx as u64)?;
        }
        c.sync_flags();
        let f = c.st.rflags as u32 & !ZF;
        c.set_arith_flags(if v == 0 { f | ZF } else { f });
        return Ok(());
    }
    // CF/OF/SF/AF/PF are undefined; Intel processors (and Zen 4) clear
    // CF/OF/SF/AF and set PF from the index (from zero for a zero source).
    let f = if v == 0 {
        // Destination unchanged (Intel documents it undefined; processors
        // leave it unchanged).
        ZF | PF
    } else {
        let idx = if forward {
            v.trailing_zeros()
        } else {
            63 - v.leading_zeros()
        };
        c.wr(bus, d, 0, idx as u64)?;
        if parity(idx as u64) {
            PF
        } else {
            0
        }
    };
    c.set_arith_flags(f);
    Ok(())
}

pub(crate) fn bsf(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    bsx(c, d, bus, true)
}
pub(crate) fn bsr(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    bsx(c, d, bus, false)
}

pub(crate) fn setcc(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let v = c.cond(d.insn.condition_code()) as u64;
    c.wr(bus, d, 0, v)
}

pub(crate) fn cmovcc(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    // The source is read (and may fault) whatever the condition.
    let v = c.rd(bus, d, 1)?;
    // (A false 32-bit CMOV still zero-extends in 64-bit mode; in 32-bit
    // mode it changes nothing.)
    if c.cond(d.insn.condition_code()) {
        c.wr(bus, d, 0, v)?;
    }
    Ok(())
}

pub(crate) fn lahf(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let f = c.eflags() & 0xd5 | FIXED1;
    c.st.gpr[0] = (c.st.gpr[0] & !0xff00) | ((f as u64) << 8);
    Ok(())
}

pub(crate) fn sahf(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let ah = ((c.st.gpr[0] >> 8) & 0xd5) as u32;
    c.sync_flags();
    let f = (c.st.rflags as u32 & !0xd5 & ARITH) | ah;
    c.set_arith_flags(f | (c.st.rflags as u32 & OF));
    Ok(())
}

fn set_cf(c: &mut Cpu, v: Option<bool>) {
    c.sync_flags();
    let cf = v.unwrap_or(c.st.rflags & CF as u64 == 0);
    if cf {
        c.st.rflags |= CF as u64;
    } else {
        c.st.rflags &= !(CF as u64);
    }
}

pub(crate) fn clc(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    set_cf(c, Some(false));
    Ok(())
}
pub(crate) fn stc(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    set_cf(c, Some(true));
    Ok(())
}
pub(crate) fn cmc(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    set_cf(c, None);
    Ok(())
}
pub(crate) fn cld(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    c.st.rflags &= !(DF as u64);
    Ok(())
}
pub(crate) fn std(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    c.st.rflags |= DF as u64;
    Ok(())
}

pub(crate) fn salc(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let v = if c.cf() { 0xff } else { 0 };
    c.sr(0, 1, v);
    Ok(())
}

pub(crate) fn xlat(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let ea = (c.gr(3, d.asize) + c.gr(0, 1)) & size_mask(d.asize);
    let v = c.read_mem(bus, d.mseg as usize, ea as u32, 1)?;
    c.sr(0, 1, v);
    Ok(())
}

pub(crate) fn pause(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if bus.pause() == crate::BusAction::Stop {
        c.pending_exit = Some(crate::RunExit::BusStop);
        c.stop_block = true;
    }
    Ok(())
}

pub(crate) fn nop(_c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    Ok(())
}

pub(crate) fn bound(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if d.ops[1].kind != OpK::Mem {
        return Err(Exc::ud());
    }
    let size = d.osize;
    let idx = sx(c.reg_get(d.ops[0]), size);
    let ea = c.ea(d);
    let lo = sx(c.read_mem(bus, d.mseg as usize, ea, size)?, size);
    let hi = sx(
        c.read_mem(bus, d.mseg as usize, ea.wrapping_add(size as u32), size)?,
        size,
    );
    if idx < lo || idx > hi {
        return Err(Exc::fault(Vector::BR));
    }
    Ok(())
}
