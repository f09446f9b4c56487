//! Lazy arithmetic flags.
//!
//! Most flag results are never read (the next instruction overwrites them),
//! so ALU instructions record their operands and result, and CF/PF/AF/ZF/SF/OF
//! are computed only when something reads them. Rarer instructions compute
//! flags eagerly and set the op to `FlagOp::Eager`.

use crate::state::flags::*;

/// How the arithmetic flags are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagOp {
    /// The arithmetic flags are in `rflags`.
    Eager,
    /// `res = a + b`.
    Add,
    /// `res = a + b + carry_in`.
    Adc,
    /// `res = a - b` (also CMP).
    Sub,
    /// `res = a - b - carry_in`.
    Sbb,
    /// AND/OR/XOR/TEST: CF = OF = 0, AF cleared.
    Logic,
    /// `res = a + 1`; CF preserved in `carry_in`.
    Inc,
    /// `res = a - 1`; CF preserved in `carry_in`.
    Dec,
}

/// The lazily held flag inputs.
#[derive(Clone, Copy, Debug)]
pub struct LazyFlags {
    /// The operation that produced the flags.
    pub op: FlagOp,
    /// Operand size in bytes (1, 2, 4, 8).
    pub size: u8,
    /// Result (zero-extended).
    pub res: u64,
    /// First operand.
    pub a: u64,
    /// Second operand.
    pub b: u64,
    /// Carry in (ADC/SBB) or preserved CF (INC/DEC).
    pub carry_in: bool,
}

impl Default for LazyFlags {
    fn default() -> Self {
        LazyFlags {
            op: FlagOp::Eager,
            size: 4,
            res: 0,
            a: 0,
            b: 0,
            carry_in: false,
        }
    }
}

/// All-ones mask for an operand size.
#[inline(always)]
pub fn size_mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size as u32 * 8)) - 1
    }
}

/// Sign bit for an operand size.
#[inline(always)]
pub fn sign_bit(size: u8) -> u64 {
    1u64 << (size as u32 * 8 - 1)
}

/// Even parity of the low byte: PF.
#[inline(always)]
pub fn parity(v: u64) -> bool {
    (v as u8).count_ones() % 2 == 0
}

impl LazyFlags {
    /// CF.
    #[inline]
    pub fn cf(&self) -> bool {
        let m = size_mask(self.size);
        match self.op {
            FlagOp::Eager => unreachable_eager(),
            FlagOp::Add => (self.res & m) < (self.a & m),
            FlagOp::Adc => {
                (self.res & m) < (self.a & m) || (self.carry_in && (self.res & m) == (self.a & m))
            }
            FlagOp::Sub => (self.a & m) < (self.b & m),
            FlagOp::Sbb => ((self.a & m) as u128) < ((self.b & m) as u128 + self.carry_in as u128),
            FlagOp::Logic => false,
            FlagOp::Inc | FlagOp::Dec => self.carry_in,
        }
    }

    /// ZF.
    #[inline]
    pub fn zf(&self) -> bool {
        self.res & size_mask(self.size) == 0
    }

    /// SF.
    #[inline]
    pub fn sf(&self) -> bool {
        self.res & sign_bit(self.size) != 0
    }

    /// PF.
    #[inline]
    pub fn pf(&self) -> bool {
        parity(self.res)
    }

    /// AF.
    #[inline]
    pub fn af(&self) -> bool {
        match self.op {
            FlagOp::Logic | FlagOp::Eager => false,
            _ => (self.a ^ self.b ^ self.res) & 0x10 != 0,
        }
    }

    /// OF.
    #[inline]
    pub fn of(&self) -> bool {
        let s = sign_bit(self.size);
        match self.op {
            FlagOp::Eager => unreachable_eager(),
            FlagOp::Add | FlagOp::Adc => (self.a ^ self.res) & (self.b ^ self.res) & s != 0,
            FlagOp::Sub | FlagOp::Sbb => (self.a ^ self.b) & (self.a ^ self.res) & s != 0,
            FlagOp::Logic => false,
            FlagOp::Inc => self.res & size_mask(self.size) == s,
            FlagOp::Dec => self.res & size_mask(self.size) == s - 1,
        }
    }

    /// All six arithmetic flags as EFLAGS bits.
    pub fn materialize(&self) -> u32 {
        let mut f = 0;
        if self.cf() {
            f |= CF;
        }
        if self.pf() {
            f |= PF;
        }
        if self.af() {
            f |= AF;
        }
        if self.zf() {
            f |= ZF;
        }
        if self.sf() {
            f |= SF;
        }
        if self.of() {
            f |= OF;
        }
        f
    }
}

#[cold]
fn unreachable_eager() -> bool {
    // Callers check for `Eager` first; answering false keeps a logic slip
    // from ever panicking inside a guest.
    debug_assert!(false, "lazy flag read while flags are eager");
    false
}
