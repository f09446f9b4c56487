//! Reports of sensitive-but-unprivileged instructions (the "x86 gap").
//!
//! When enabled, the CPU reports each such instruction after it executed,
//! with the value the hardware produced, so a monitor (the `trap` engine's
//! audit) can compare it with what the guest expected at virtual ring 0.
//! Reporting never changes what the guest observes.

/// The sensitive instructions the CPU reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SensitiveKind {
    /// SGDT: stores the real GDTR.
    Sgdt,
    /// SIDT: stores the real IDTR.
    Sidt,
    /// SLDT: stores the real LDTR selector.
    Sldt,
    /// STR: stores the real TR selector.
    Str,
    /// SMSW: stores the low bits of the real CR0.
    Smsw,
    /// PUSHF: pushes the real EFLAGS.
    Pushf,
    /// POPF: IF/IOPL changes may be silently dropped.
    Popf,
    /// LAR.
    Lar,
    /// LSL.
    Lsl,
    /// VERR.
    Verr,
    /// VERW.
    Verw,
    /// MOV from CS/SS or PUSH CS/SS: reveals the real RPL.
    ReadSegment,
    /// MOV/POP to a segment register: checks against the real CPL.
    LoadSegment,
    /// Far CALL.
    FarCall,
    /// Far JMP.
    FarJmp,
    /// Far RET.
    FarRet,
    /// IRET.
    Iret,
    /// INT n / INT3 / INTO.
    SoftInt,
    /// RDTSC.
    Rdtsc,
    /// CPUID.
    Cpuid,
    /// SYSENTER/SYSEXIT.
    Sysenter,
}

/// One executed sensitive instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SensitiveEvent {
    /// Which instruction.
    pub kind: SensitiveKind,
    /// CS base + EIP of the instruction.
    pub linear_ip: u64,
    /// EIP of the instruction.
    pub ip: u64,
    /// CPL it ran at.
    pub cpl: u8,
    /// IOPL at the time.
    pub iopl: u8,
    /// The operand the instruction consumed (e.g. the value POPF popped, the
    /// selector LAR examined), when there is one.
    pub operand: u64,
    /// The value the hardware produced (e.g. the EFLAGS PUSHF pushed, the
    /// GDTR base SGDT stored, the EFLAGS after POPF).
    pub result: u64,
}
