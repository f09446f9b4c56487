//! Exception vectors and the error type instructions return.

use crate::cpu::RunExit;

/// Architectural exception vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Vector {
    /// Divide error.
    DE = 0,
    /// Debug.
    DB = 1,
    /// Non-maskable interrupt.
    NMI = 2,
    /// Breakpoint (INT3).
    BP = 3,
    /// Overflow (INTO).
    OF = 4,
    /// BOUND range exceeded.
    BR = 5,
    /// Invalid opcode.
    UD = 6,
    /// Device not available.
    NM = 7,
    /// Double fault.
    DF = 8,
    /// Invalid TSS.
    TS = 10,
    /// Segment not present.
    NP = 11,
    /// Stack-segment fault.
    SS = 12,
    /// General protection.
    GP = 13,
    /// Page fault.
    PF = 14,
    /// x87 floating-point error.
    MF = 16,
    /// Alignment check.
    AC = 17,
    /// Machine check.
    MC = 18,
    /// SIMD floating-point.
    XM = 19,
}

impl Vector {
    /// Does this exception push an error code (protected mode)?
    pub fn has_error_code(v: u8) -> bool {
        matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17)
    }

    /// Contributory exceptions for the double-fault rule (SDM table 6-4).
    pub fn contributory(v: u8) -> bool {
        matches!(v, 0 | 10 | 11 | 12 | 13)
    }
}

/// How an instruction ended abnormally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exc {
    /// An exception raised by the instruction. For faults RIP still points
    /// at the instruction.
    Fault {
        /// Vector.
        vector: u8,
        /// Error code, if the exception has one.
        code: Option<u32>,
    },
    /// The instruction completed; leave the run loop with this exit.
    Exit(RunExit),
}

impl Exc {
    /// An exception without an error code.
    #[inline]
    pub fn fault(v: Vector) -> Exc {
        Exc::Fault {
            vector: v as u8,
            code: None,
        }
    }

    /// An exception with an error code.
    #[inline]
    pub fn fault_code(v: Vector, code: u32) -> Exc {
        Exc::Fault {
            vector: v as u8,
            code: Some(code),
        }
    }

    /// #GP(code).
    #[inline]
    pub fn gp(code: u32) -> Exc {
        Exc::fault_code(Vector::GP, code)
    }

    /// #UD.
    #[inline]
    pub fn ud() -> Exc {
        Exc::fault(Vector::UD)
    }
}

/// Result of an instruction step.
pub type Res<T = ()> = Result<T, Exc>;
