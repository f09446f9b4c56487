//! Differential test: the software CPU against the host CPU (silicon is the
//! oracle, `docs/cpu.md`).
//!
//! A seeded generator builds short sequences (1–12 instructions, plus the
//! register set-up they need) of unprivileged IA-32 code over all operand
//! sizes. Each sequence runs
//!
//! * natively, through the kernel's IA32 compatibility mode, in a tiny
//!   freestanding i386 program (`tests/differential/runner.c`) that this test
//!   builds with `gcc -m32 -ffreestanding -nostdlib -static` (no multilib or
//!   32-bit libc is needed); and
//! * on the model, in flat 32-bit protected mode at CPL 3 with Linux's user
//!   selectors (CS = 0x23, DS = ES = SS = 0x2b, FS = GS = 0), IOPL 0, IF = 1,
//!   no LDT, a TSS without I/O bitmap, and paging that maps exactly the
//!   runner's pages at the same linear addresses: code at 0x1000_0000 (two
//!   pages), a scratch data page at 0x1010_0000 and a stack page at
//!   0x1020_0000, so absolute memory operands mean the same on both sides
//!   and a stray access faults on both.
//!
//! The eight GPRs, EFLAGS, the final EIP (the model must stop at the end of
//! the sequence) and both data pages are compared. The runner is started
//! once per batch of cases, not once per case. The model ends a run at a
//! `HLT` after the sequence (#GP at CPL 3, stopped through
//! `exception_bitmap`); the runner jumps back to itself instead.
//!
//! Some sequences end in an exception on purpose: #PF (loads, stores,
//! read-modify-writes, pushes and string operations at unmapped addresses
//! or straddling a page end), #DE, #UD (UD2, LOCK on a register), #GP(0)
//! (HLT, CLI, STI, IN, OUT, MOV CR0 at CPL 3) and #GP(selector) (segment
//! loads beyond the GDT, into the absent LDT, SS with RPL ≠ CPL). The runner
//! catches the signal and reports what the kernel saw (vector, error code,
//! EIP, CR2 and the registers at the fault); the model must stop with the
//! same exception, at the same instruction, with the same state (EFLAGS
//! minus RF, which the kernel reports as pushed). Anything that kills the
//! runner otherwise is reported and the runner restarted after that case.
//!
//! What is generated: ADD/OR/ADC/SBB/AND/SUB/XOR/CMP/TEST in every encoding
//! (including the AL/AX/EAX and `82` forms), INC/DEC/NEG/NOT, all shifts and
//! rotates by 1, imm8 and CL with counts 0…255, SHLD/SHRD, MUL/IMUL (1, 2, 3
//! operands), DIV/IDIV (dividend and divisor built so the quotient fits),
//! BT/BTS/BTR/BTC (immediate offsets, and register offsets that reach outside
//! the operand into the scratch page), BSF/BSR (zero sources too), BSWAP,
//! XCHG/XADD/CMPXCHG/CMPXCHG8B (both outcomes), CMOVcc/SETcc, Jcc/JMP/LOOP*/
//! JECXZ/JCXZ forward skips, CALL/RET/RET imm16, LEA (32- and 16-bit
//! addressing), MOV/MOVZX/MOVSX, CBW…CDQ, the BCD adjusts, LAHF/SAHF/CLC/
//! STC/CMC/CLD/STD/SALC, MOVS/STOS/LODS/CMPS/SCAS with REP/REPE/REPNE, both
//! DF values and segment overrides, PUSH/POP (registers, memory, immediates,
//! segment registers), PUSHF/POPF (random flags, IOPL and IF bits that CPL 3
//! must ignore), PUSHA/POPA, ENTER/LEAVE (all nesting levels), MOV to and
//! from segment registers, XLAT, ESP-relative operands (`pop [esp+4]`),
//! LOCK on memory read-modify-writes, and self-modifying code (a store into
//! a later instruction of the same block). All memory operands use every
//! 32-bit addressing form (base + index × scale + disp, with wrapping
//! register values) and 16-bit operand-size forms appear throughout. Half of
//! the sequences start just before the end of the first code page, so
//! instructions straddle the page boundary.
//!
//! A second test, `differential_16bit_addressing`, checks 16-bit addressing
//! (which cannot run natively: such addresses are below `vm.mmap_min_addr`)
//! against the host indirectly: the model runs the sequence with its memory
//! operands in `[bx|bp + si|di + disp]` form (register values that wrap at
//! 64 KiB, random upper halves) and DS/ES/SS based so that they reach the
//! same bytes that the native code addresses with 32-bit absolute operands.
//!
//! # Environment
//!
//! * `POPEK_DIFF_CASES` — number of sequences (default 20 000; 10⁶ and more
//!   for long runs: about 35 s per million here). The 16-bit addressing test
//!   runs a quarter of that.
//! * `POPEK_DIFF_SEED` — the run's seed (decimal or 0x-hex; default fixed, so
//!   CI is reproducible). Case `i` is generated from `(seed, i)` alone.
//! * `POPEK_DIFF_ONLY` — run only case `i` of the seed (for debugging).
//! * `POPEK_DIFF_STATS=1` — print how often each mnemonic was generated.
//! * `POPEK_DIFF_SHOW=1` — list every case, not only mismatches.
//! * `POPEK_DIFF_LOOSE=1` — mask the flags the SDM leaves undefined (the
//!   table below). By default nothing is masked: the model runs the host's
//!   vendor profile (`popek_cpu::vendor`) and must match the host exactly.
//! * `POPEK_DIFF_RECORD=FILE` — also write the sequences whose outcome
//!   depends on the vendor profile, with the host's results, as a vector
//!   file (see `vendor_profiles_match_recorded_vectors`);
//!   `POPEK_DIFF_RECORD_MODEL=intel|amd` records that profile of the model
//!   instead (a regression lock where no such silicon is at hand) and
//!   `POPEK_DIFF_RECORD_SOURCE` says where it came from.
//!
//! # Undefined flags (the masking table, `POPEK_DIFF_LOOSE`)
//!
//! The generator tracks, along every path through the sequence's forward
//! branches, which arithmetic flags are undefined (per the Intel SDM vol. 2)
//! because of the last instruction that wrote them; those are masked out of
//! the EFLAGS comparison. Before an instruction that *reads* a flag that is
//! undefined at that point (Jcc/SETcc/CMOVcc, ADC/SBB, RCL/RCR, PUSHF, LAHF,
//! DAA/DAS/AAA/AAS, CMC, SALC, LOOPE/LOOPNE…) it inserts a `CMP`, which
//! defines all six. The table:
//!
//! | instruction                    | undefined after it                                  |
//! |--------------------------------|-----------------------------------------------------|
//! | AND OR XOR TEST                | AF                                                  |
//! | SHL/SAL/SHR/SAR, count≠0       | AF; OF unless count = 1; CF for SHL/SHR when count ≥ operand bits |
//! | ROL/ROR/RCL/RCR, count≠0       | OF unless count = 1 (RCL/RCR by a multiple of 9 or 17 leave CF alone) |
//! | SHLD/SHRD, count≠0             | AF; OF unless count = 1; all six when count > operand bits |
//! | MUL, IMUL                      | SF ZF AF PF                                         |
//! | DIV, IDIV                      | CF OF SF ZF AF PF                                   |
//! | BT BTS BTR BTC                 | OF SF AF PF                                         |
//! | BSF BSR                        | CF OF SF AF PF                                      |
//! | DAA DAS                        | OF                                                  |
//! | AAA AAS                        | OF SF ZF PF                                         |
//! | AAM AAD                        | OF AF CF                                            |
//!
//! (Counts are the masked count, `count & 31`.) REPE/REPNE CMPS/SCAS may
//! run no iteration and then define nothing. Results the SDM calls undefined
//! are *not* masked even then — BSF/BSR with a zero source (unchanged), MOV
//! from a segment register to a 32-bit register (zero-extended), BSWAP of a
//! 16-bit register, SHLD/SHRD of a 16-bit operand by more than 16, the upper
//! half of a 32-bit PUSH of a segment register — because the model follows
//! what the host vendor's processors do and the host checks that.
//!
//! The test also reports how many sequences differed *only* in masked flags
//! and which instruction left the differing flag undefined (informational).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, EncodingKind, Formatter,
    Instruction, InstructionBlock, IntelFormatter, MemoryOperand, Mnemonic, OpCodeOperandKind as K,
    Register, RepPrefixKind,
};
use popek_cpu::state::{flags as fl, seg, Segment};
use popek_cpu::vendor::host_cpu_description;
use popek_cpu::{Cpu, CpuState, NullBus, RunExit, Vendor};
use popek_memory::GuestRam;

const CODE: u32 = 0x1000_0000;
const SCRATCH: u32 = 0x1010_0000;
const STACK: u32 = 0x1020_0000;
const PAGE: usize = 4096;
/// The model's GDT and TSS: supervisor pages far from anything the generated
/// code touches (its stray accesses must fault as not-present, as natively).
const GDT: u64 = 0x30_1000;
const RAM_SIZE: u64 = 0x1040_0000;

const CF: u32 = fl::CF;
const PF: u32 = fl::PF;
const AF: u32 = fl::AF;
const ZF: u32 = fl::ZF;
const SF: u32 = fl::SF;
const OF: u32 = fl::OF;
const ALL: u32 = fl::ARITH;

const R32: [Register; 8] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBX,
    Register::ESP,
    Register::EBP,
    Register::ESI,
    Register::EDI,
];
const R16: [Register; 8] = [
    Register::AX,
    Register::CX,
    Register::DX,
    Register::BX,
    Register::SP,
    Register::BP,
    Register::SI,
    Register::DI,
];
const R8: [Register; 8] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::AH,
    Register::CH,
    Register::DH,
    Register::BH,
];

// ---------------------------------------------------------------------------
// Random numbers

/// splitmix64: small, seedable, good enough.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    /// A value of `bits` bits, biased towards edge cases.
    fn value(&mut self, bits: u32) -> u64 {
        let m = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let sign = 1u64 << (bits - 1);
        let v = match self.below(10) {
            0 => self.pick(&[0, 1, 2, m, m - 1, sign, sign - 1, sign + 1]),
            1 => self.below(16),
            2 => m - self.below(16),
            3 => sign ^ self.below(4),
            _ => self.next(),
        };
        v & m
    }
}

/// The page fill both sides compute (xorshift32, see runner.c).
fn fill(seed: u32, kind: u32) -> Vec<u8> {
    let mut x = if seed == 0 { 1 } else { seed };
    let mut out = Vec::with_capacity(PAGE);
    for i in 0..PAGE / 4 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let w = match kind {
            1 => x & 0x0303_0303,
            2 => {
                if i & 15 == 0 {
                    x
                } else {
                    0
                }
            }
            _ => x,
        };
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

// ---------------------------------------------------------------------------
// Test cases

/// One generated sequence.
#[derive(Clone)]
struct Case {
    index: u64,
    code: Vec<u8>,
    /// EAX ECX EDX EBX ESP EBP ESI EDI.
    regs: [u32; 8],
    eflags: u32,
    seed: u32,
    kind: u32,
    /// Arithmetic flags undefined at the end (masked).
    undef: u32,
    /// For each EFLAGS bit, the instruction that last left it undefined.
    undef_src: [Option<Mnemonic>; 12],
    /// 16-bit addressing cases: the model runs this code instead, whose
    /// memory operands use 16-bit addressing with DS/ES/SS based at
    /// `SCRATCH - window`, so that they reach the same bytes.
    model_code: Option<Vec<u8>>,
    window: u32,
    /// Offset of the code from `CODE` (near the end of the first code page
    /// for half of the cases, so that instructions cross the page end).
    code_off: u32,
}

impl Case {
    fn start(&self) -> u32 {
        CODE + self.code_off
    }
    fn end_ip(&self) -> u32 {
        self.start() + self.code.len() as u32
    }
    fn model_end_ip(&self) -> u32 {
        self.start() + self.model_code.as_ref().unwrap_or(&self.code).len() as u32
    }
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    regs: [u32; 8],
    eflags: u32,
    eip: u32,
    /// Changed dwords of the scratch page: (offset, value).
    scratch: Vec<(u32, u32)>,
    /// Changed dwords of the stack page.
    stack: Vec<(u32, u32)>,
    /// Set when the model stopped in an unexpected way.
    fault: Option<String>,
    /// An exception that ended the run: vector, error code, EIP and (for
    /// #PF) CR2 — natively the trapno/err/eip/cr2 of the signal frame.
    exc: Option<(u32, u32, u32, u32)>,
}

// ---------------------------------------------------------------------------
// The generator

#[derive(Clone, Copy)]
enum Opnd {
    R(Register),
    M(MemoryOperand),
    I(i64),
}

fn imm_arg(v: i64) -> ImmArg {
    if v >= i32::MIN as i64 && v <= i32::MAX as i64 {
        ImmArg::S(v as i32)
    } else {
        ImmArg::U(v as u32)
    }
}

enum ImmArg {
    S(i32),
    U(u32),
}

macro_rules! with_imm {
    ($f:ident, $code:expr, $($pre:expr,)* ; $v:expr) => {
        match imm_arg($v) {
            ImmArg::S(s) => Instruction::$f($code, $($pre,)* s),
            ImmArg::U(u) => Instruction::$f($code, $($pre,)* u),
        }
    };
}

/// Builds an instruction from a Code and resolved operands.
fn build(code: Code, ops: &[Opnd]) -> Instruction {
    use Opnd::*;
    let r = match ops {
        [] => Ok(Instruction::with(code)),
        [R(a)] => Instruction::with1(code, *a),
        [M(a)] => Instruction::with1(code, *a),
        [I(a)] => with_imm!(with1, code, ; *a),
        [R(a), R(b)] => Instruction::with2(code, *a, *b),
        [R(a), M(b)] => Instruction::with2(code, *a, *b),
        [M(a), R(b)] => Instruction::with2(code, *a, *b),
        [R(a), I(b)] => with_imm!(with2, code, *a, ; *b),
        [M(a), I(b)] => with_imm!(with2, code, *a, ; *b),
        [I(a), I(b)] => Instruction::with2(code, *a as i32, *b as i32),
        [I(a), R(b)] => Instruction::with2(code, *a as i32, *b),
        [R(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
        [M(a), R(b), R(c)] => Instruction::with3(code, *a, *b, *c),
        [R(a), R(b), I(c)] => with_imm!(with3, code, *a, *b, ; *c),
        [R(a), M(b), I(c)] => with_imm!(with3, code, *a, *b, ; *c),
        [M(a), R(b), I(c)] => with_imm!(with3, code, *a, *b, ; *c),
        _ => panic!("no builder for {code:?} with {} operands", ops.len()),
    };
    r.unwrap_or_else(|e| panic!("building {code:?}: {e}"))
}

fn mov_imm(reg: Register, v: u64) -> Instruction {
    let code = match reg.size() {
        1 => Code::Mov_r8_imm8,
        2 => Code::Mov_r16_imm16,
        _ => Code::Mov_r32_imm32,
    };
    let v = match reg.size() {
        1 => v & 0xff,
        2 => v & 0xffff,
        _ => v & 0xffff_ffff,
    };
    build(code, &[Opnd::R(reg), Opnd::I(v as i64)])
}

fn mov_mem_imm(m: MemoryOperand, size: u32, v: u64) -> Instruction {
    let code = match size {
        1 => Code::Mov_rm8_imm8,
        2 => Code::Mov_rm16_imm16,
        _ => Code::Mov_rm32_imm32,
    };
    let v = v & if size == 4 {
        0xffff_ffff
    } else {
        (1 << (size * 8)) - 1
    };
    build(code, &[Opnd::M(m), Opnd::I(v as i64)])
}

/// The address of an instruction's absolute (no base, no index) memory
/// operand.
fn abs_addr(ins: &Instruction) -> Option<u32> {
    let mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == iced_x86::OpKind::Memory);
    (mem && ins.memory_base() == Register::None && ins.memory_index() == Register::None)
        .then(|| ins.memory_displacement32())
}

fn abs(addr: u32) -> MemoryOperand {
    MemoryOperand::new(
        Register::None,
        Register::None,
        1,
        addr as i64,
        4,
        false,
        Register::None,
    )
}

fn reg_of(size: u32, n: usize) -> Register {
    match size {
        1 => R8[n],
        2 => R16[n],
        _ => R32[n],
    }
}

/// The segment register of an implicit segment-register operand kind.
fn sreg_of(k: K) -> Register {
    match k {
        K::es => Register::ES,
        K::cs => Register::CS,
        K::ss => Register::SS,
        K::ds => Register::DS,
        K::fs => Register::FS,
        K::gs => Register::GS,
        _ => panic!("not a segment register operand: {k:?}"),
    }
}

/// Flag bits from iced's RflagsBits.
fn iced_flags(b: u32) -> u32 {
    use iced_x86::RflagsBits as B;
    let mut f = 0;
    for (ib, eb) in [
        (B::OF, OF),
        (B::SF, SF),
        (B::ZF, ZF),
        (B::AF, AF),
        (B::CF, CF),
        (B::PF, PF),
    ] {
        if b & ib != 0 {
            f |= eb;
        }
    }
    f
}

/// One generated unit: set-up instructions and the instruction under test.
/// A branch in a unit skips whole units.
struct Unit {
    insns: Vec<Instruction>,
    /// Per instruction: the 16-bit-addressing form of its memory operand.
    m16: Vec<Option<MemoryOperand>>,
    /// Index (into `insns`) of a branch and the unit it jumps to.
    branch: Option<(usize, usize)>,
    /// Branches to instructions of the same unit: (index, target index).
    local: Vec<(usize, usize)>,
    /// Self-modifying code: indices of a store and of the instruction whose
    /// immediate it overwrites (its address is patched in after encoding).
    smc: Option<(usize, usize)>,
}

/// What an instruction does to the flags: (defined, undefined) sets.
fn flag_effect(ins: &Instruction, count: Option<u32>) -> (u32, u32) {
    use Mnemonic::*;
    let bits = ins.op0_register().size().max(ins.memory_size().size()) as u32 * 8;
    match ins.mnemonic() {
        // REPE/REPNE with ECX = 0 leave the flags alone.
        Cmpsb | Cmpsw | Cmpsd | Scasb | Scasw | Scasd
            if ins.has_repe_prefix() || ins.has_repne_prefix() =>
        {
            (0, 0)
        }
        Add | Adc | Sub | Sbb | Cmp | Neg | Xadd | Cmpxchg | Cmpsb | Cmpsw | Cmpsd | Scasb
        | Scasw | Scasd => (ALL, 0),
        And | Or | Xor | Test => (ALL & !AF, AF),
        Inc | Dec => (ALL & !CF, 0),
        Shl | Sal | Shr | Sar => {
            let n = count.expect("shift count") & 31;
            if n == 0 {
                return (0, 0);
            }
            let mut undef = AF;
            if n != 1 {
                undef |= OF;
            }
            if ins.mnemonic() != Sar && n >= bits {
                undef |= CF;
            }
            (ALL & !undef, undef)
        }
        Rol | Ror | Rcl | Rcr => {
            let n = count.expect("rotate count") & 31;
            match n {
                0 => (0, 0),
                1 => (CF | OF, 0),
                // RCL/RCR by a multiple of 9 or 17 rotate nothing: CF stays
                // as it was (SDM pseudocode: tempCOUNT = 0), OF undefined.
                _ if matches!(ins.mnemonic(), Rcl | Rcr) && n % (bits + 1) == 0 => (0, OF),
                _ => (CF, OF),
            }
        }
        Shld | Shrd => {
            let n = count.expect("shift count") & 31;
            if n == 0 {
                (0, 0)
            } else if n > bits {
                (0, ALL)
            } else if n == 1 {
                (ALL & !AF, AF)
            } else {
                (ALL & !(AF | OF), AF | OF)
            }
        }
        Mul | Imul => (CF | OF, SF | ZF | AF | PF),
        Div | Idiv => (0, ALL),
        Bt | Bts | Btr | Btc => (CF, OF | SF | AF | PF),
        Bsf | Bsr => (ZF, CF | OF | SF | AF | PF),
        Daa | Das => (ALL & !OF, OF),
        Aaa | Aas => (CF | AF, OF | SF | ZF | PF),
        Aam | Aad => (SF | ZF | PF, OF | AF | CF),
        Sahf => (ALL & !OF, 0),
        Clc | Stc | Cmc => (CF, 0),
        Cmpxchg8b => (ZF, 0),
        Popf | Popfd => (ALL, 0),
        _ => (0, 0),
    }
}

/// Codes by mnemonic, 32-bit-mode legacy encodings only.
struct Codes {
    map: HashMap<Mnemonic, Vec<Code>>,
}

impl Codes {
    fn new() -> Codes {
        let mut m: HashMap<Mnemonic, Vec<Code>> = HashMap::new();
        for c in Code::values() {
            let oc = c.op_code();
            if !oc.mode32() || oc.encoding() != EncodingKind::Legacy || !oc.is_instruction() {
                continue;
            }
            let name = format!("{c:?}");
            // The 486 A-step CMPXCHG encoding and POP CS do not exist today.
            if name.starts_with("Cmpxchg486") || c == Code::Popw_CS {
                continue;
            }
            m.entry(c.mnemonic()).or_default().push(c);
        }
        Codes { map: m }
    }
    fn of(&self, mn: Mnemonic) -> &[Code] {
        self.map.get(&mn).map(|v| v.as_slice()).unwrap_or(&[])
    }
    /// The codes of `mn` whose operands `Gen::operands` can fill.
    fn generic(&self, mn: Mnemonic) -> Vec<Code> {
        self.of(mn)
            .iter()
            .copied()
            .filter(|c| {
                let oc = c.op_code();
                (0..oc.op_count()).all(|i| {
                    matches!(
                        oc.op_kind(i),
                        K::r8_or_mem
                            | K::r16_or_mem
                            | K::r32_or_mem
                            | K::r8_reg
                            | K::r8_opcode
                            | K::r16_reg
                            | K::r16_opcode
                            | K::r32_reg
                            | K::r32_opcode
                            | K::al
                            | K::ax
                            | K::eax
                            | K::cl
                            | K::imm8
                            | K::imm8sex16
                            | K::imm8sex32
                            | K::imm16
                            | K::imm32
                            | K::imm8_const_1
                            | K::mem_offs
                    )
                })
            })
            .collect()
    }
}

struct Gen<'a> {
    rng: Rng,
    codes: &'a Codes,
    units: Vec<Unit>,
    /// Flags undefined at the current point.
    undef: u32,
    /// Per EFLAGS bit: the instruction that last made it undefined.
    undef_src: [Option<Mnemonic>; 12],
    /// Undefined sets flowing into a unit from earlier branches.
    incoming: HashMap<usize, u32>,
    /// Worst-case stack use so far (bytes below the initial ESP).
    stack_used: u32,
    /// Instructions of the current unit.
    cur: Vec<Instruction>,
    cur_branch: Option<(usize, usize)>,
    cur_local: Vec<(usize, usize)>,
    cur_smc: Option<(usize, usize)>,
    n_units: usize,
    /// 16-bit addressing mode: the window (see `Case::model_code`).
    addr16: Option<u32>,
    /// While generating a faulting unit: the address memory operands use.
    fault_addr: Option<u32>,
    /// 16-bit forms of this unit's scratch addresses.
    map16: HashMap<u32, MemoryOperand>,
    /// Per instruction of the current unit: its 16-bit-addressing form.
    cur16: Vec<Option<MemoryOperand>>,
}

const STACK_BUDGET: u32 = 0x900;

impl<'a> Gen<'a> {
    fn emit(&mut self, ins: Instruction) {
        let alt = self.addr16.and_then(|w| {
            let a = abs_addr(&ins)?;
            if !(SCRATCH..SCRATCH + PAGE as u32).contains(&a) {
                return None;
            }
            let m = self.map16.get(&a).copied().unwrap_or_else(|| {
                let ea = (w + a - SCRATCH) as i64;
                MemoryOperand::new(
                    Register::None,
                    Register::None,
                    1,
                    ea,
                    2,
                    false,
                    Register::None,
                )
            });
            Some(MemoryOperand {
                segment_prefix: ins.segment_prefix(),
                ..m
            })
        });
        self.cur.push(ins);
        self.cur16.push(alt);
    }

    /// 16-bit addressing: a `[bx/bp + si/di + disp]` form for `addr`, with
    /// the register set-up; the native code uses the absolute address.
    fn mem16(&mut self, addr: u32, w: u32, avoid: &[usize]) {
        let ea = w + addr - SCRATCH;
        let forms: &[(Option<usize>, Option<usize>)] = &[
            (Some(3), Some(6)),
            (Some(3), Some(7)),
            (Some(5), Some(6)),
            (Some(5), Some(7)),
            (Some(6), None),
            (Some(7), None),
            (Some(5), None),
            (Some(3), None),
            (None, None),
        ];
        let (b, i) = loop {
            let f = self.rng.pick(forms);
            if ![f.0, f.1].iter().flatten().any(|r| avoid.contains(r)) {
                break f;
            }
        };
        let (disp, ds) = if b.is_none() && i.is_none() {
            (ea as i64, 2)
        } else {
            match self.rng.below(3) {
                0 if b != Some(5) || i.is_some() => (0, 0),
                1 => (self.rng.range(-128, 127), 1),
                _ => (self.rng.range(-0x8000, 0x7fff), 2),
            }
        };
        // The sum wraps at 64 KiB; the upper halves of the registers are
        // random and must be ignored.
        let mut left = ea as i64 - disp;
        if let (Some(b), Some(_)) = (b, i) {
            let bv = self.rng.value(16) as i64;
            let v = (self.rng.next() & 0xffff_0000) | (bv as u64 & 0xffff);
            self.emit(mov_imm(R32[b], v));
            left -= bv;
        }
        let last = i.or(b);
        if let Some(r) = last {
            let v = (self.rng.next() & 0xffff_0000) | (left as u64 & 0xffff);
            self.emit(mov_imm(R32[r], v));
        }
        let r16 = |r: Option<usize>| r.map_or(Register::None, |r| R16[r]);
        let m = MemoryOperand::new(r16(b), r16(i), 1, disp, ds, false, Register::None);
        self.map16.insert(addr, m);
    }

    /// Emits the instruction under test, tracking flags.
    fn test(&mut self, mut ins: Instruction, count: Option<u32>) {
        use Mnemonic::*;
        if ins.op0_kind() == iced_x86::OpKind::Memory
            && matches!(
                ins.mnemonic(),
                Add | Adc
                    | And
                    | Btc
                    | Btr
                    | Bts
                    | Cmpxchg
                    | Cmpxchg8b
                    | Dec
                    | Inc
                    | Neg
                    | Not
                    | Or
                    | Sbb
                    | Sub
                    | Xor
                    | Xadd
                    | Xchg
            )
            && self.rng.chance(15)
        {
            ins.set_has_lock_prefix(true);
        }
        let reads = iced_flags(ins.rflags_read());
        if reads & self.undef != 0 {
            self.sanitize();
        }
        let (def, undef) = flag_effect(&ins, count);
        self.undef = (self.undef & !(def | undef)) | undef;
        for (b, src) in self.undef_src.iter_mut().enumerate() {
            if undef & (1 << b) != 0 {
                *src = Some(ins.mnemonic());
            }
        }
        self.emit(ins);
    }

    /// A CMP that defines all six arithmetic flags.
    fn sanitize(&mut self) {
        let r = R32[self.rng.below(8) as usize];
        let v = self.rng.value(32) as i64;
        self.emit(build(Code::Cmp_rm32_imm32, &[Opnd::R(r), Opnd::I(v)]));
        self.undef = 0;
    }

    /// A register number, never ESP unless `esp_ok`.
    fn regn(&mut self, esp_ok: bool, avoid: &[usize]) -> usize {
        loop {
            let n = self.rng.below(8) as usize;
            if (n != 4 || esp_ok) && !avoid.contains(&n) {
                return n;
            }
        }
    }

    fn reg(&mut self, size: u32, esp_ok: bool) -> Register {
        if size == 1 {
            return R8[self.rng.below(8) as usize];
        }
        let n = self.regn(esp_ok, &[]);
        reg_of(size, n)
    }

    /// A memory operand addressing `size` bytes at a random place in the
    /// scratch page, with whatever set-up its base/index need. `avoid`: GPR
    /// numbers the instruction's own set-up writes afterwards.
    fn mem_at(&mut self, size: u32, avoid: &[usize], lo: u32, hi: u32) -> (MemoryOperand, u32) {
        let off = self.rng.range(lo as i64, (hi - size) as i64) as u32;
        let addr = self.fault_addr.unwrap_or(SCRATCH + off);
        if let Some(w) = self.addr16 {
            self.mem16(addr, w, avoid);
            let s = if self.rng.chance(10) {
                self.rng.pick(&[Register::DS, Register::ES, Register::SS])
            } else {
                Register::None
            };
            let m = MemoryOperand {
                segment_prefix: s,
                ..abs(addr)
            };
            return (m, addr);
        }
        let mut avoid: Vec<usize> = avoid.to_vec();
        avoid.push(4);
        let m = match self.rng.below(5) {
            0 => abs(addr),
            1 => {
                let b = self.regn(false, &avoid);
                let disp = match self.rng.below(3) {
                    0 => 0,
                    1 => self.rng.range(-128, 127),
                    _ => self.rng.range(-0x1000_0000, 0x1000_0000),
                };
                self.emit(mov_imm(R32[b], (addr as i64 - disp) as u64));
                let ds = if disp == 0 {
                    0
                } else if (-128..=127).contains(&disp) {
                    1
                } else {
                    4
                };
                MemoryOperand::new(R32[b], Register::None, 1, disp, ds, false, Register::None)
            }
            2 | 3 => {
                let b = self.regn(false, &avoid);
                avoid.push(b);
                let i = self.regn(false, &avoid);
                let scale = self.rng.pick(&[1u32, 2, 4, 8]);
                let iv = self.rng.range(-64, 64);
                let disp = match self.rng.below(3) {
                    0 => 0,
                    1 => self.rng.range(-128, 127),
                    _ => self.rng.range(-0x100_0000, 0x100_0000),
                };
                let bv = addr as i64 - iv * scale as i64 - disp;
                self.emit(mov_imm(R32[b], bv as u64));
                self.emit(mov_imm(R32[i], iv as u64));
                let ds = if disp == 0 {
                    0
                } else if (-128..=127).contains(&disp) {
                    1
                } else {
                    4
                };
                MemoryOperand::new(R32[b], R32[i], scale, disp, ds, false, Register::None)
            }
            _ => {
                let i = self.regn(false, &avoid);
                let scale = self.rng.pick(&[1u32, 2, 4, 8]);
                let iv = self.rng.range(-64, 64);
                let disp = addr as i64 - iv * scale as i64;
                self.emit(mov_imm(R32[i], iv as u64));
                MemoryOperand::new(
                    Register::None,
                    R32[i],
                    scale,
                    disp,
                    4,
                    false,
                    Register::None,
                )
            }
        };
        let m = if self.rng.chance(10) {
            // A segment override: every data segment is flat.
            let s = self.rng.pick(&[Register::DS, Register::ES, Register::SS]);
            MemoryOperand {
                segment_prefix: s,
                ..m
            }
        } else {
            m
        };
        (m, addr)
    }

    fn mem(&mut self, size: u32, avoid: &[usize]) -> (MemoryOperand, u32) {
        self.mem_at(size, avoid, 0, PAGE as u32)
    }

    fn imm(&mut self, k: K) -> i64 {
        match k {
            K::imm8 => self.rng.value(8) as i64,
            K::imm8sex16 | K::imm8sex32 => self.rng.value(8) as u8 as i8 as i64,
            K::imm16 => self.rng.value(16) as i64,
            K::imm32 => self.rng.value(32) as i64,
            K::imm8_const_1 => 1,
            _ => panic!("not an immediate kind: {k:?}"),
        }
    }

    /// Operands for `code`, generically. `avoid` as for `mem`.
    fn operands(&mut self, code: Code, avoid: &[usize]) -> (Vec<Opnd>, Option<u32>) {
        let oc = code.op_code();
        let mut ops = Vec::new();
        let mut addr = None;
        let mn = code.mnemonic();
        for i in 0..oc.op_count() {
            let k = oc.op_kind(i);
            // ESP only as a plain source.
            let esp_ok = i > 0
                && matches!(
                    mn,
                    Mnemonic::Add
                        | Mnemonic::Sub
                        | Mnemonic::Cmp
                        | Mnemonic::Test
                        | Mnemonic::And
                        | Mnemonic::Mov
                        | Mnemonic::Movzx
                        | Mnemonic::Movsx
                        | Mnemonic::Imul
                );
            let o = match k {
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem => {
                    let size = match k {
                        K::r8_or_mem => 1,
                        K::r16_or_mem => 2,
                        _ => 4,
                    };
                    if self.rng.chance(45) {
                        let (m, a) = self.mem(size, avoid);
                        addr = Some(a);
                        Opnd::M(m)
                    } else {
                        Opnd::R(self.reg(size, esp_ok))
                    }
                }
                K::r8_reg | K::r8_opcode => Opnd::R(self.reg(1, false)),
                K::r16_reg | K::r16_opcode => Opnd::R(self.reg(2, esp_ok)),
                K::r32_reg | K::r32_opcode => Opnd::R(self.reg(4, esp_ok)),
                K::al => Opnd::R(Register::AL),
                K::ax => Opnd::R(Register::AX),
                K::eax => Opnd::R(Register::EAX),
                K::cl => Opnd::R(Register::CL),
                K::imm8 | K::imm8sex16 | K::imm8sex32 | K::imm16 | K::imm32 | K::imm8_const_1 => {
                    Opnd::I(self.imm(k))
                }
                K::mem_offs => {
                    let size = (0..oc.op_count())
                        .map(|j| match oc.op_kind(j) {
                            K::al => 1,
                            K::ax => 2,
                            _ => 4,
                        })
                        .min()
                        .unwrap_or(4);
                    let off = self.rng.below((PAGE as u32 - size) as u64) as u32;
                    addr = Some(SCRATCH + off);
                    Opnd::M(abs(SCRATCH + off))
                }
                _ => panic!("generic operands: {code:?} operand {i} is {k:?}"),
            };
            ops.push(o);
        }
        (ops, addr)
    }

    fn generic(&mut self, mns: &[Mnemonic]) {
        let mn = self.rng.pick(mns);
        let mut codes = self.codes.generic(mn);
        if self.addr16.is_some() {
            // MOV moffs has no register form to rewrite: leave it out.
            codes.retain(|c| {
                let oc = c.op_code();
                (0..oc.op_count()).all(|i| oc.op_kind(i) != K::mem_offs)
            });
        }
        let code = self.rng.pick(&codes);
        let (mut ops, _) = self.operands(code, &[]);
        if mn == Mnemonic::Aam {
            // AAM 0 is #DE.
            ops[0] = Opnd::I(self.rng.range(1, 255));
        }
        if matches!(
            mn,
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        ) {
            // A register bit offset on memory reaches anywhere: see `bitop`.
            if let (Opnd::M(_), Opnd::R(r)) = (ops[0], ops[1]) {
                ops[0] = Opnd::R(reg_of(r.size() as u32, self.regn(false, &[])));
            }
        }
        let ins = build(code, &ops);
        self.test(ins, None);
    }

    fn shift(&mut self) {
        use Mnemonic::*;
        let mn = self
            .rng
            .pick(&[Shl, Sal, Shr, Sar, Rol, Ror, Rcl, Rcr, Shld, Shrd]);
        let code = self.rng.pick(self.codes.of(mn));
        let oc = code.op_code();
        let last = oc.op_kind(oc.op_count() - 1);
        let count: u32 = if self.rng.chance(60) {
            self.rng
                .pick(&[0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 63, 255])
        } else {
            self.rng.below(256) as u32
        };
        let count = if last == K::imm8_const_1 { 1 } else { count };
        let avoid: &[usize] = if last == K::cl { &[1] } else { &[] };
        let (mut ops, _) = self.operands(code, avoid);
        let n = ops.len();
        match last {
            K::imm8 => ops[n - 1] = Opnd::I(count as i64),
            K::cl => self.emit(mov_imm(Register::CL, count as u64)),
            _ => {}
        }
        // The count register itself may be the destination: CL is set last.
        let ins = build(code, &ops);
        self.test(ins, Some(count));
    }

    fn muldiv(&mut self) {
        use Mnemonic::*;
        let mn = self.rng.pick(&[Mul, Imul, Imul, Div, Idiv, Div, Idiv]);
        if mn == Mul || mn == Imul {
            return self.generic(&[mn]);
        }
        let size = self.rng.pick(&[1u32, 2, 4]);
        let code = match (mn, size) {
            (Div, 1) => Code::Div_rm8,
            (Div, 2) => Code::Div_rm16,
            (Div, _) => Code::Div_rm32,
            (_, 1) => Code::Idiv_rm8,
            (_, 2) => Code::Idiv_rm16,
            _ => Code::Idiv_rm32,
        };
        let bits = size * 8;
        let (q, d, r): (i128, i128, i128) = if mn == Div {
            let max = (1i128 << bits) - 1;
            let d = (self.rng.value(bits) as i128).max(1);
            let q = self.rng.value(bits) as i128 & max;
            let r = self.rng.below(d as u64) as i128;
            (q, d, r)
        } else {
            let d = self.rng.value(bits) as i128;
            let d = d - if d >> (bits - 1) != 0 {
                1i128 << bits
            } else {
                0
            };
            let d = if d == 0 { -1 } else { d };
            let q = self.rng.value(bits) as i128;
            let q = q - if q >> (bits - 1) != 0 {
                1i128 << bits
            } else {
                0
            };
            let r = self.rng.below(d.unsigned_abs() as u64) as i128;
            let r = if q * d < 0 { -r } else { r };
            (q, d, r)
        };
        let dividend = q * d + r;
        // The divisor: never the dividend's registers.
        let op = if self.rng.chance(50) {
            let (m, _) = self.mem(size, &[0, 2]);
            self.emit(mov_mem_imm(m, size, d as u64));
            Opnd::M(m)
        } else {
            let n = if size == 1 {
                self.rng.pick(&[1usize, 2, 3, 5, 6, 7])
            } else {
                self.rng.pick(&[1usize, 3, 5, 6, 7])
            };
            let reg = reg_of(size, n);
            self.emit(mov_imm(reg, d as u64));
            Opnd::R(reg)
        };
        let dv = dividend as u128;
        match size {
            1 => self.emit(mov_imm(Register::AX, (dv & 0xffff) as u64)),
            2 => {
                self.emit(mov_imm(Register::AX, (dv & 0xffff) as u64));
                self.emit(mov_imm(Register::DX, ((dv >> 16) & 0xffff) as u64));
            }
            _ => {
                self.emit(mov_imm(Register::EAX, (dv & 0xffff_ffff) as u64));
                self.emit(mov_imm(Register::EDX, ((dv >> 32) & 0xffff_ffff) as u64));
            }
        }
        let ins = build(code, &[op]);
        self.test(ins, None);
    }

    fn bitop(&mut self) {
        use Mnemonic::*;
        let mn = self.rng.pick(&[Bt, Bts, Btr, Btc]);
        if self.rng.chance(50) {
            return self.generic(&[mn]);
        }
        // Memory destination, register bit offset: the offset reaches
        // outside the operand (either way), staying inside the page.
        let size = self.rng.pick(&[2u32, 4]);
        let code = match (mn, size) {
            (Bt, 2) => Code::Bt_rm16_r16,
            (Bt, _) => Code::Bt_rm32_r32,
            (Bts, 2) => Code::Bts_rm16_r16,
            (Bts, _) => Code::Bts_rm32_r32,
            (Btr, 2) => Code::Btr_rm16_r16,
            (Btr, _) => Code::Btr_rm32_r32,
            (_, 2) => Code::Btc_rm16_r16,
            _ => Code::Btc_rm32_r32,
        };
        let rn = self.regn(false, &[]);
        let (m, _) = self.mem_at(size, &[rn], 0x600, 0xa00);
        let off = self.rng.range(-0x500 * 8, 0x500 * 8);
        self.emit(mov_imm(reg_of(size, rn), off as u64));
        let ins = build(code, &[Opnd::M(m), Opnd::R(reg_of(size, rn))]);
        self.test(ins, None);
    }

    fn bsx(&mut self) {
        let mn = self.rng.pick(&[Mnemonic::Bsf, Mnemonic::Bsr]);
        let code = self.rng.pick(self.codes.of(mn));
        let (ops, _) = self.operands(code, &[]);
        if self.rng.chance(30) {
            let size = code.op_code().op_kind(0) == K::r16_reg;
            let size = if size { 2 } else { 4 };
            match ops[1] {
                Opnd::R(r) => self.emit(mov_imm(r, 0)),
                Opnd::M(m) => self.emit(mov_mem_imm(m, size, 0)),
                _ => {}
            }
        }
        let ins = build(code, &ops);
        self.test(ins, None);
    }

    fn xchg_family(&mut self) {
        use Mnemonic::*;
        let mn = self.rng.pick(&[Xchg, Xadd, Cmpxchg, Cmpxchg, Cmpxchg8b]);
        if mn == Cmpxchg8b {
            let (m, a) = self.mem(8, &[0, 2]);
            if self.rng.chance(50) {
                self.emit(build(
                    Code::Mov_r32_rm32,
                    &[Opnd::R(Register::EAX), Opnd::M(abs(a))],
                ));
                self.emit(build(
                    Code::Mov_r32_rm32,
                    &[Opnd::R(Register::EDX), Opnd::M(abs(a + 4))],
                ));
            }
            let ins = build(Code::Cmpxchg8b_m64, &[Opnd::M(m)]);
            return self.test(ins, None);
        }
        let code = self.rng.pick(self.codes.of(mn));
        let (ops, _) = self.operands(code, &[0]);
        if mn == Cmpxchg && self.rng.chance(40) {
            let size = match code.op_code().op_kind(0) {
                K::r8_or_mem => 1,
                K::r16_or_mem => 2,
                _ => 4,
            };
            let acc = reg_of(size, 0);
            let mov = match size {
                1 => Code::Mov_r8_rm8,
                2 => Code::Mov_r16_rm16,
                _ => Code::Mov_r32_rm32,
            };
            self.emit(build(mov, &[Opnd::R(acc), ops[0]]));
        }
        let ins = build(code, &ops);
        self.test(ins, None);
    }

    fn string(&mut self) {
        let op = self.rng.below(5);
        let size = self.rng.pick(&[1u32, 2, 4]);
        let rep = match self.rng.below(4) {
            0 => RepPrefixKind::None,
            1 | 2 => RepPrefixKind::Repe,
            _ => {
                if op >= 3 {
                    RepPrefixKind::Repne
                } else {
                    RepPrefixKind::Repe
                }
            }
        };
        let segp = if self.rng.chance(20) {
            self.rng
                .pick(&[Register::ES, Register::SS, Register::CS, Register::DS])
        } else {
            Register::None
        };
        if self.rng.chance(30) {
            let c = if self.rng.chance(50) {
                Code::Std
            } else {
                Code::Cld
            };
            self.emit(Instruction::with(c));
        }
        let si = self.rng.range(0x100, 0xf00) as u32;
        let di = match self.rng.below(4) {
            0 => si,
            1 => (si as i64 + self.rng.range(-8, 8)) as u32,
            _ => self.rng.range(0x100, 0xf00) as u32,
        };
        self.emit(mov_imm(Register::ESI, (SCRATCH + si) as u64));
        self.emit(mov_imm(Register::EDI, (SCRATCH + di) as u64));
        if rep != RepPrefixKind::None || self.rng.chance(30) {
            let n = self.rng.below(10);
            self.emit(mov_imm(Register::ECX, n));
        }
        let r = match (op, size) {
            (0, 1) => Instruction::with_movsb(32, segp, rep),
            (0, 2) => Instruction::with_movsw(32, segp, rep),
            (0, _) => Instruction::with_movsd(32, segp, rep),
            (1, 1) => Instruction::with_stosb(32, rep),
            (1, 2) => Instruction::with_stosw(32, rep),
            (1, _) => Instruction::with_stosd(32, rep),
            (2, 1) => Instruction::with_lodsb(32, segp, rep),
            (2, 2) => Instruction::with_lodsw(32, segp, rep),
            (2, _) => Instruction::with_lodsd(32, segp, rep),
            (3, 1) => Instruction::with_cmpsb(32, segp, rep),
            (3, 2) => Instruction::with_cmpsw(32, segp, rep),
            (3, _) => Instruction::with_cmpsd(32, segp, rep),
            (_, 1) => Instruction::with_scasb(32, rep),
            (_, 2) => Instruction::with_scasw(32, rep),
            (_, _) => Instruction::with_scasd(32, rep),
        };
        let ins = r.unwrap();
        self.test(ins, None);
    }

    fn stack(&mut self) {
        use Mnemonic::*;
        let k = self.rng.below(12);
        let cost: u32 = match k {
            8 => 32 * 4 + 4 + 64,
            6 => 32,
            _ => 8,
        };
        if self.stack_used + cost > STACK_BUDGET {
            return self.generic(&[Add, Xor]);
        }
        self.stack_used += cost;
        match k {
            0 | 1 => {
                // PUSH of a register (ESP included), memory or immediate.
                let code = self.rng.pick(self.codes.of(Push));
                let oc = code.op_code();
                let k0 = oc.op_kind(0);
                let ops = match k0 {
                    K::r16_opcode => vec![Opnd::R(R16[self.rng.below(8) as usize])],
                    K::r32_opcode => vec![Opnd::R(R32[self.rng.below(8) as usize])],
                    K::r16_or_mem
                    | K::r32_or_mem
                    | K::imm8sex16
                    | K::imm8sex32
                    | K::imm16
                    | K::imm32 => self.operands(code, &[]).0,
                    k => vec![Opnd::R(sreg_of(k))],
                };
                let ins = build(code, &ops);
                self.test(ins, None);
            }
            2 | 3 => {
                let code = self.rng.pick(self.codes.of(Pop));
                let oc = code.op_code();
                match oc.op_kind(0) {
                    K::r16_opcode | K::r32_opcode | K::r16_or_mem | K::r32_or_mem => {
                        let (ops, _) = self.operands(code, &[]);
                        self.test(build(code, &ops), None);
                    }
                    kind => {
                        // POP Sreg: push a selector that is valid for it.
                        let w = format!("{code:?}").starts_with("Popw");
                        let sel = match kind {
                            K::fs | K::gs => 0,
                            _ => 0x2b,
                        };
                        let push = if w {
                            Code::Push_imm16
                        } else {
                            Code::Pushd_imm32
                        };
                        self.emit(build(push, &[Opnd::I(sel)]));
                        self.test(build(code, &[Opnd::R(sreg_of(kind))]), None);
                    }
                }
            }
            4 => {
                let code = self.rng.pick(&[Code::Pushfd, Code::Pushfw]);
                self.test(Instruction::with(code), None);
            }
            5 => {
                // POPF with random arithmetic flags, DF, NT, ID, IF, IOPL and
                // reserved bits; never TF or AC (they would trap natively).
                let mut v = (self.rng.next() as u32) & (ALL | fl::DF | fl::IF | fl::IOPL);
                if self.rng.chance(15) {
                    v |= fl::NT;
                }
                if self.rng.chance(30) {
                    v |= fl::ID;
                }
                if self.rng.chance(20) {
                    v |= (self.rng.next() as u32) & 0xffc0_8028;
                }
                if self.rng.chance(30) {
                    self.emit(build(Code::Push_imm16, &[Opnd::I((v & 0xffff) as i64)]));
                    self.test(Instruction::with(Code::Popfw), None);
                } else {
                    self.emit(build(Code::Pushd_imm32, &[Opnd::I(v as i64)]));
                    self.test(Instruction::with(Code::Popfd), None);
                }
            }
            6 => {
                let code = self
                    .rng
                    .pick(&[Code::Pushad, Code::Pushaw, Code::Popad, Code::Popaw]);
                self.test(Instruction::with(code), None);
            }
            7 | 8 => {
                // ENTER/LEAVE with EBP inside the stack page.
                let ebp = STACK + self.rng.range(0xa00, 0xe00) as u32;
                self.emit(mov_imm(Register::EBP, ebp as u64));
                if k == 7 {
                    let code = self.rng.pick(&[Code::Leaved, Code::Leavew]);
                    self.test(Instruction::with(code), None);
                } else {
                    let code = self
                        .rng
                        .pick(&[Code::Enterd_imm16_imm8, Code::Enterw_imm16_imm8]);
                    let alloc = self.rng.below(64) as i64;
                    let level = if self.rng.chance(70) {
                        self.rng.below(4) as i64
                    } else {
                        self.rng.below(256) as i64
                    };
                    self.test(build(code, &[Opnd::I(alloc), Opnd::I(level)]), None);
                }
            }
            9 => {
                // MOV to DS/ES/SS/FS/GS with the value it already has.
                let (sreg, sel) = self.rng.pick(&[
                    (Register::DS, 0x2b),
                    (Register::ES, 0x2b),
                    (Register::SS, 0x2b),
                    (Register::FS, 0),
                    (Register::GS, 0),
                ]);
                let code = self.rng.pick(&[Code::Mov_Sreg_rm16, Code::Mov_Sreg_r32m16]);
                let src = if self.rng.chance(50) {
                    let (m, _) = self.mem(2, &[]);
                    self.emit(mov_mem_imm(m, 2, sel));
                    Opnd::M(m)
                } else {
                    let n = self.regn(false, &[]);
                    let r = if code == Code::Mov_Sreg_rm16 {
                        R16[n]
                    } else {
                        R32[n]
                    };
                    let v = (self.rng.next() & 0xffff_0000) | sel;
                    self.emit(mov_imm(R32[n], v));
                    Opnd::R(r)
                };
                self.test(build(code, &[Opnd::R(sreg), src]), None);
            }
            10 => {
                // MOV from a segment register.
                let code = self.rng.pick(&[Code::Mov_rm16_Sreg, Code::Mov_r32m16_Sreg]);
                let sreg = self.rng.pick(&[
                    Register::ES,
                    Register::CS,
                    Register::SS,
                    Register::DS,
                    Register::FS,
                    Register::GS,
                ]);
                let dst = if self.rng.chance(40) {
                    Opnd::M(self.mem(2, &[]).0)
                } else {
                    Opnd::R(if code == Code::Mov_rm16_Sreg {
                        self.reg(2, false)
                    } else {
                        self.reg(4, false)
                    })
                };
                self.test(build(code, &[dst, Opnd::R(sreg)]), None);
            }
            _ => {
                // XLAT with EBX at a table inside the page.
                let t = SCRATCH + self.rng.range(0, 0xf00) as u32;
                self.emit(mov_imm(Register::EBX, t as u64));
                let segp = if self.rng.chance(20) {
                    Register::ES
                } else {
                    Register::None
                };
                let m = MemoryOperand::new(Register::EBX, Register::AL, 1, 0, 0, false, segp);
                self.test(build(Code::Xlat_m8, &[Opnd::M(m)]), None);
            }
        }
    }

    fn lea(&mut self) {
        let code = self.rng.pick(&[Code::Lea_r32_m, Code::Lea_r16_m]);
        let dst = if code == Code::Lea_r32_m {
            self.reg(4, false)
        } else {
            self.reg(2, false)
        };
        let m = if self.rng.chance(25) {
            // 16-bit addressing: no memory access, so it runs natively.
            let (b, i) = self.rng.pick(&[
                (Register::BX, Register::SI),
                (Register::BX, Register::DI),
                (Register::BP, Register::SI),
                (Register::BP, Register::DI),
                (Register::SI, Register::None),
                (Register::DI, Register::None),
                (Register::BP, Register::None),
                (Register::BX, Register::None),
            ]);
            let (disp, ds) = match self.rng.below(3) {
                0 if b != Register::BP => (0, 0),
                1 => (self.rng.range(-128, 127), 1),
                _ => (self.rng.range(-0x8000, 0x7fff), 2),
            };
            MemoryOperand::new(b, i, 1, disp, ds, false, Register::None)
        } else {
            let b = if self.rng.chance(80) {
                R32[self.rng.below(8) as usize]
            } else {
                Register::None
            };
            let i = if self.rng.chance(50) {
                R32[self.regn(false, &[])]
            } else {
                Register::None
            };
            let disp = self.rng.value(32) as u32 as i32 as i64;
            let ds = if b == Register::None {
                4
            } else {
                self.rng.pick(&[0u32, 1, 4])
            };
            let disp = match ds {
                0 => 0,
                1 => disp as i8 as i64,
                _ => disp,
            };
            let scale = self.rng.pick(&[1u32, 2, 4, 8]);
            MemoryOperand::new(
                b,
                i,
                if i == Register::None { 1 } else { scale },
                disp,
                ds,
                false,
                Register::None,
            )
        };
        self.test(build(code, &[Opnd::R(dst), Opnd::M(m)]), None);
    }

    /// Jcc / LOOP / JECXZ over the next few units.
    fn branch(&mut self, unit: usize) {
        let left = self.n_units - unit - 1;
        let skip = self.rng.below(4).min(left as u64) as usize;
        let target = unit + 1 + skip;
        let code = match self.rng.below(8) {
            0 => {
                if self.rng.chance(50) {
                    let n = self.rng.below(3);
                    self.emit(mov_imm(Register::ECX, n));
                }
                self.rng.pick(&[
                    Code::Loop_rel8_32_ECX,
                    Code::Loope_rel8_32_ECX,
                    Code::Loopne_rel8_32_ECX,
                    Code::Jecxz_rel8_32,
                    Code::Jcxz_rel8_32,
                    Code::Loop_rel8_32_CX,
                    Code::Loope_rel8_32_CX,
                    Code::Loopne_rel8_32_CX,
                ])
            }
            _ => {
                let cc: &[Code] = &[
                    Code::Jo_rel32_32,
                    Code::Jno_rel32_32,
                    Code::Jb_rel32_32,
                    Code::Jae_rel32_32,
                    Code::Je_rel32_32,
                    Code::Jne_rel32_32,
                    Code::Jbe_rel32_32,
                    Code::Ja_rel32_32,
                    Code::Js_rel32_32,
                    Code::Jns_rel32_32,
                    Code::Jp_rel32_32,
                    Code::Jnp_rel32_32,
                    Code::Jl_rel32_32,
                    Code::Jge_rel32_32,
                    Code::Jle_rel32_32,
                    Code::Jg_rel32_32,
                    Code::Jmp_rel32_32,
                ];
                self.rng.pick(cc)
            }
        };
        // The target is patched when the unit IPs are known.
        let ins = Instruction::with_branch(code, 0).unwrap();
        self.test(ins, None);
        self.cur_branch = Some((self.cur.len() - 1, target));
        let u = self.undef;
        *self.incoming.entry(target).or_insert(0) |= u;
    }

    /// An instruction that faults: #PF (unmapped or page-straddling data
    /// accesses, a string operation running off the scratch page, a push
    /// below the stack page), #DE, #UD, #GP(0) for privileged instructions
    /// and #GP(selector) for bad segment loads. Both sides must report the
    /// same vector, error code, EIP and CR2, with the state as it was at
    /// the faulting instruction.
    fn fault(&mut self, unit: usize) {
        use Mnemonic::*;
        // A fault leaves the flags as they were before the instruction:
        // make them all defined there.
        self.sanitize();
        match self.rng.below(10) {
            0..=3 => {
                // A memory operand at an unmapped address, or straddling the
                // end of the scratch page.
                let a = match self.rng.below(4) {
                    0 => SCRATCH + 0x1000 + self.rng.below(0x1000) as u32,
                    1 => SCRATCH - 0x1000 + self.rng.below(0x1000) as u32,
                    2 => self.rng.below(0x1000) as u32,
                    _ => SCRATCH + 0x1000 - 1 - self.rng.below(7) as u32,
                };
                self.fault_addr = Some(a);
                match self.rng.below(6) {
                    0 => self.generic(&[Add, Or, Adc, Sbb, And, Sub, Xor, Cmp, Test, Inc, Neg]),
                    1 => self.generic(&[Mov, Movzx, Movsx, Xchg, Xadd, Cmpxchg]),
                    2 => self.shift(),
                    3 => self.bitop(),
                    4 => self.xchg_family(),
                    _ => {
                        let code =
                            self.rng
                                .pick(&[Code::Push_rm32, Code::Pop_rm32, Code::Push_rm16]);
                        let (m, _) = self.mem(4, &[]);
                        self.test(build(code, &[Opnd::M(m)]), None);
                    }
                }
                self.fault_addr = None;
            }
            4 => {
                // REP MOVS/STOS off the end of the scratch page (DF = 0).
                let size = self.rng.pick(&[1u32, 2, 4]);
                self.emit(Instruction::with(Code::Cld));
                let n = self.rng.range(2, 12) as u32;
                let start = SCRATCH + 0x1000 - size * self.rng.range(1, n as i64 - 1) as u32;
                self.emit(mov_imm(Register::ESI, (SCRATCH + 0x100) as u64));
                self.emit(mov_imm(Register::EDI, start as u64));
                self.emit(mov_imm(Register::ECX, n as u64));
                let rep = RepPrefixKind::Repe;
                let ins = match (self.rng.below(2), size) {
                    (0, 1) => Instruction::with_movsb(32, Register::None, rep),
                    (0, 2) => Instruction::with_movsw(32, Register::None, rep),
                    (0, _) => Instruction::with_movsd(32, Register::None, rep),
                    (_, 1) => Instruction::with_stosb(32, rep),
                    (_, 2) => Instruction::with_stosw(32, rep),
                    (_, _) => Instruction::with_stosd(32, rep),
                };
                self.test(ins.unwrap(), None);
            }
            5 => {
                // Pushes below the stack page.
                let esp = STACK + self.rng.below(12) as u32;
                self.emit(mov_imm(Register::ESP, esp as u64));
                let code = self.rng.pick(&[
                    Code::Push_r32,
                    Code::Pushad,
                    Code::Pushfd,
                    Code::Enterd_imm16_imm8,
                    Code::Call_rel32_32,
                ]);
                let ins = match code {
                    Code::Push_r32 => {
                        let r = R32[self.rng.below(8) as usize];
                        build(code, &[Opnd::R(r)])
                    }
                    Code::Enterd_imm16_imm8 => {
                        let ebp = STACK + 0x800;
                        self.emit(mov_imm(Register::EBP, ebp as u64));
                        let level = self.rng.below(8) as i64;
                        build(code, &[Opnd::I(8), Opnd::I(level)])
                    }
                    Code::Call_rel32_32 => {
                        // A call to the next unit.
                        let ins = Instruction::with_branch(code, 0).unwrap();
                        self.test(ins, None);
                        self.cur_branch = Some((self.cur.len() - 1, unit + 1));
                        return;
                    }
                    _ => Instruction::with(code),
                };
                self.test(ins, None);
            }
            6 => {
                // #DE: divide by zero or a quotient that does not fit.
                let code = self.rng.pick(&[
                    Code::Div_rm32,
                    Code::Idiv_rm32,
                    Code::Div_rm8,
                    Code::Idiv_rm16,
                ]);
                let size = match code {
                    Code::Div_rm8 => 1,
                    Code::Idiv_rm16 => 2,
                    _ => 4,
                };
                let r = reg_of(size, self.rng.pick(&[1usize, 3, 6, 7]));
                let d = if self.rng.chance(50) { 0 } else { 1 };
                self.emit(mov_imm(r, d));
                let (lo, hi) = (self.rng.value(32), self.rng.value(32));
                self.emit(mov_imm(Register::EAX, lo));
                self.emit(mov_imm(Register::EDX, 0x4000_0000 | hi));
                self.test(build(code, &[Opnd::R(r)]), None);
            }
            7 => {
                // #UD: UD2, or LOCK on a register destination.
                if self.rng.chance(50) {
                    self.test(Instruction::with(Code::Ud2), None);
                } else {
                    let mut ins = build(
                        Code::Add_rm32_r32,
                        &[Opnd::R(self.reg(4, false)), Opnd::R(self.reg(4, false))],
                    );
                    ins.set_has_lock_prefix(true);
                    self.emit(ins);
                }
            }
            8 => {
                // #GP(0): privileged or IOPL-sensitive at CPL 3.
                let ins = match self.rng.below(6) {
                    0 => Instruction::with(Code::Hlt),
                    1 => Instruction::with(Code::Cli),
                    2 => Instruction::with(Code::Sti),
                    3 => build(
                        Code::In_AL_DX,
                        &[Opnd::R(Register::AL), Opnd::R(Register::DX)],
                    ),
                    4 => build(Code::Out_imm8_AL, &[Opnd::I(0x80), Opnd::R(Register::AL)]),
                    _ => build(
                        Code::Mov_cr_r32,
                        &[Opnd::R(Register::CR0), Opnd::R(Register::EAX)],
                    ),
                };
                self.emit(ins);
            }
            _ => {
                // #GP(selector): selectors beyond the GDT, in the (absent)
                // LDT, or SS with RPL ≠ CPL.
                let rpl = self.rng.below(4);
                let (sreg, sel) = self.rng.pick(&[
                    (Register::DS, 0x400 | rpl),
                    (Register::ES, 0x7ff8 | rpl),
                    (Register::FS, 0x4 | rpl),
                    (Register::SS, 0x28),
                    (Register::SS, 0),
                    (Register::GS, 0x1004 | rpl),
                ]);
                self.emit(mov_imm(Register::AX, sel));
                self.emit(build(
                    Code::Mov_Sreg_rm16,
                    &[Opnd::R(sreg), Opnd::R(Register::AX)],
                ));
            }
        }
    }

    /// CALL to a RET (or RET imm16) behind a JMP to the next unit.
    fn call_ret(&mut self, unit: usize) {
        if self.stack_used + 8 > STACK_BUDGET {
            return self.generic(&[Mnemonic::Add]);
        }
        self.stack_used += 8;
        self.test(
            Instruction::with_branch(Code::Call_rel32_32, 0).unwrap(),
            None,
        );
        let call = self.cur.len() - 1;
        self.test(
            Instruction::with_branch(Code::Jmp_rel32_32, 0).unwrap(),
            None,
        );
        let jmp = self.cur.len() - 1;
        let ret = if self.rng.chance(50) {
            Instruction::with(Code::Retnd)
        } else {
            let n = self.rng.pick(&[0, 2, 4, 8, 12]);
            build(Code::Retnd_imm16, &[Opnd::I(n)])
        };
        self.test(ret, None);
        self.cur_local.push((call, self.cur.len() - 1));
        self.cur_branch = Some((jmp, unit + 1));
        let u = self.undef;
        *self.incoming.entry(unit + 1).or_insert(0) |= u;
    }

    /// Self-modifying code: a store into the immediate of a later
    /// `MOV r32, imm32` in the same unit (the decoded-code cache must see it).
    fn smc(&mut self) {
        let r = R32[self.regn(false, &[])];
        let byte = self.rng.chance(40);
        let k = if byte { self.rng.below(4) as u32 } else { 0 };
        let v = self.rng.value(32);
        let st = self.cur.len();
        self.emit(if byte {
            mov_mem_imm(abs(0x1000_0ff0 + k), 1, v)
        } else {
            mov_mem_imm(abs(0x1000_0ff0), 4, v)
        });
        if self.rng.chance(50) {
            self.generic(&[Mnemonic::Add, Mnemonic::Xor, Mnemonic::Inc]);
        }
        let tg = self.cur.len();
        let w = self.rng.value(32);
        self.emit(mov_imm(r, w));
        self.cur_smc = Some((st, tg));
    }

    /// Operations on the stack page through ESP-based addressing.
    fn esp_relative(&mut self) {
        if self.stack_used + 8 > STACK_BUDGET {
            return self.generic(&[Mnemonic::Sub]);
        }
        self.stack_used += 8;
        let disp = self.rng.below(9) as i64 * self.rng.pick(&[1, 4]);
        let ds = if disp == 0 { 0 } else { 1 };
        let m = MemoryOperand::new(
            Register::ESP,
            Register::None,
            1,
            disp,
            ds,
            false,
            Register::None,
        );
        let r = R32[self.regn(false, &[])];
        let ins = match self.rng.below(5) {
            0 => build(Code::Push_rm32, &[Opnd::M(m)]),
            // POP computes the address with the incremented ESP.
            1 => build(Code::Pop_rm32, &[Opnd::M(m)]),
            2 => build(Code::Mov_r32_rm32, &[Opnd::R(r), Opnd::M(m)]),
            3 => build(Code::Add_rm32_r32, &[Opnd::M(m), Opnd::R(r)]),
            _ => build(Code::Pop_rm16, &[Opnd::M(m)]),
        };
        self.test(ins, None);
    }

    fn unit(&mut self, i: usize) {
        use Mnemonic::*;
        self.map16.clear();
        if self.addr16.is_some() {
            // Only what touches memory through explicit operands (the model
            // has DS/ES/SS moved, so no stack, string or code accesses).
            return match self.rng.below(100) {
                0..=29 => self.generic(&[Add, Or, Adc, Sbb, And, Sub, Xor, Cmp, Test]),
                30..=39 => self.generic(&[Inc, Dec, Neg, Not, Mov, Movzx, Movsx]),
                40..=54 => self.shift(),
                55..=64 => self.muldiv(),
                65..=74 => self.bitop(),
                75..=79 => self.bsx(),
                80..=89 => self.xchg_family(),
                90..=94 => self.generic(&[Sete, Setl, Seta]),
                _ => self.branch(i),
            };
        }
        if self.rng.chance(3) {
            return self.smc();
        }
        if self.rng.chance(3) {
            return self.esp_relative();
        }
        if self.rng.chance(2) {
            return self.call_ret(i);
        }
        if self.rng.chance(3) {
            return self.fault(i);
        }
        match self.rng.below(100) {
            0..=21 => self.generic(&[Add, Or, Adc, Sbb, And, Sub, Xor, Cmp, Test]),
            22..=27 => self.generic(&[Inc, Dec, Neg, Not]),
            28..=39 => self.shift(),
            40..=46 => self.muldiv(),
            47..=51 => self.bitop(),
            52..=54 => self.bsx(),
            55..=59 => self.xchg_family(),
            60..=61 => self.generic(&[Bswap]),
            62..=67 => {
                let mns: Vec<Mnemonic> = [
                    Cmovo, Cmovno, Cmovb, Cmovae, Cmove, Cmovne, Cmovbe, Cmova, Cmovs, Cmovns,
                    Cmovp, Cmovnp, Cmovl, Cmovge, Cmovle, Cmovg, Seto, Setno, Setb, Setae, Sete,
                    Setne, Setbe, Seta, Sets, Setns, Setp, Setnp, Setl, Setge, Setle, Setg,
                ]
                .to_vec();
                self.generic(&mns)
            }
            68..=74 => self.branch(i),
            75..=76 => self.lea(),
            77..=80 => self.generic(&[Mov, Movzx, Movsx]),
            81..=82 => self.generic(&[Cbw, Cwde, Cwd, Cdq]),
            83..=85 => self.generic(&[Daa, Das, Aaa, Aas, Aam, Aad]),
            86..=88 => self.generic(&[Lahf, Sahf, Clc, Stc, Cmc, Cld, Std, Salc, Nop]),
            89..=92 => self.string(),
            _ => self.stack(),
        }
    }
}

/// Generates case `index` of the run seeded with `seed`; with `addr16`, a
/// case whose memory operands use 16-bit addressing on the model.
fn generate(codes: &Codes, seed: u64, index: u64, addr16: bool) -> Case {
    let salt = if addr16 { 0x16 } else { 0 };
    let mut rng = Rng(seed ^ salt ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
    rng.next();
    let window = if addr16 { rng.below(0xf001) as u32 } else { 0 };
    let code_off = if rng.chance(50) {
        0
    } else {
        0x1000 - 1 - rng.below(64) as u32
    };
    let n_units = 1 + rng.below(12) as usize;
    let mut regs = [0u32; 8];
    for r in regs.iter_mut() {
        *r = rng.value(32) as u32;
    }
    regs[4] = (STACK + rng.range(0xc00, 0xe00) as u32) & !rng.pick(&[3, 3, 3, 1]);
    if rng.chance(30) {
        regs[5] = STACK + rng.range(0xa00, 0xe00) as u32;
    }
    let eflags = 0x202 | (rng.next() as u32 & (ALL | fl::DF));
    let page_seed = rng.next() as u32;
    let kind = rng.pick(&[0, 0, 0, 1, 1, 2]);
    let mut g = Gen {
        rng,
        codes,
        units: Vec::new(),
        undef: 0,
        undef_src: [None; 12],
        incoming: HashMap::new(),
        stack_used: 0,
        cur: Vec::new(),
        cur_branch: None,
        cur_local: Vec::new(),
        cur_smc: None,
        n_units,
        addr16: addr16.then_some(window),
        fault_addr: None,
        map16: HashMap::new(),
        cur16: Vec::new(),
    };
    for i in 0..n_units {
        if let Some(u) = g.incoming.remove(&i) {
            g.undef |= u;
        }
        g.unit(i);
        let insns = std::mem::take(&mut g.cur);
        let m16 = std::mem::take(&mut g.cur16);
        let branch = g.cur_branch.take();
        let local = std::mem::take(&mut g.cur_local);
        let smc = g.cur_smc.take();
        g.units.push(Unit {
            insns,
            m16,
            branch,
            local,
            smc,
        });
    }
    if let Some(u) = g.incoming.remove(&n_units) {
        g.undef |= u;
    }
    // A final NOP gives branches to the end a target.
    g.units.push(Unit {
        insns: vec![Instruction::with(Code::Nopd)],
        m16: vec![None],
        branch: None,
        local: Vec::new(),
        smc: None,
    });
    // Fake IPs identify instructions for the block encoder's branch fixing.
    let mut ips = Vec::new();
    let mut ip = 0x1_0000u64;
    for _ in &g.units {
        ips.push(ip);
        ip += 0x100;
    }
    let mut all = Vec::new();
    let mut all16 = Vec::new();
    let mut patches = Vec::new();
    for (ui, u) in g.units.iter().enumerate() {
        if let Some((st, tg)) = u.smc {
            patches.push((all.len() + st, all.len() + tg));
        }
        for (k, ins) in u.insns.iter().enumerate() {
            let mut ins = *ins;
            ins.set_ip(ips[ui] + k as u64);
            if let Some((bk, target)) = u.branch {
                if bk == k {
                    ins.set_near_branch32(ips[target] as u32);
                }
            }
            for &(bk, t) in &u.local {
                if bk == k {
                    ins.set_near_branch32((ips[ui] + t as u64) as u32);
                }
            }
            all.push(ins);
            let mut i16 = ins;
            if let Some(m) = u.m16[k] {
                i16.set_memory_base(m.base);
                i16.set_memory_index(m.index);
                i16.set_memory_index_scale(1);
                i16.set_memory_displ_size(m.displ_size);
                i16.set_memory_displacement64(m.displacement as u16 as u64);
                i16.set_segment_prefix(m.segment_prefix);
            }
            all16.push(i16);
        }
    }
    let model_code = addr16.then(|| {
        let block = InstructionBlock::new(&all16, (CODE + code_off) as u64);
        BlockEncoder::encode(32, block, BlockEncoderOptions::NONE)
            .unwrap_or_else(|e| panic!("case {index}: encoding (16-bit addressing) failed: {e}"))
            .code_buffer
    });
    let block = InstructionBlock::new(&all, (CODE + code_off) as u64);
    let res = BlockEncoder::encode(
        32,
        block,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .unwrap_or_else(|e| panic!("case {index}: encoding failed: {e}"));
    let mut code = res.code_buffer;
    for (st, tg) in patches {
        // The store is `C7 05 disp32 imm32` or `C6 05 disp32 imm8`; the
        // target `B8+r imm32`: point the store into the target's immediate.
        let so = res.new_instruction_offsets[st] as usize;
        let to = res.new_instruction_offsets[tg] as usize;
        assert!(
            matches!(code[so], 0xc6 | 0xc7) && code[so + 1] == 0x05,
            "case {index}: SMC store encoding"
        );
        let delta = all[st].memory_displacement32() - 0x1000_0ff0;
        let addr = CODE + code_off + to as u32 + 1 + delta;
        code[so + 2..so + 6].copy_from_slice(&addr.to_le_bytes());
    }
    Case {
        index,
        code,
        regs,
        eflags,
        seed: page_seed,
        kind,
        undef: g.undef,
        undef_src: g.undef_src,
        model_code,
        window,
        code_off,
    }
}

// ---------------------------------------------------------------------------
// The model side

struct Model {
    cpu: Cpu,
    base: CpuState,
}

/// The native user selectors of a Linux IA32 process (what the runner
/// reports), for replaying recorded vectors without the runner.
const LINUX_USER_SELS: [u16; 6] = [0x23, 0x2b, 0x2b, 0x2b, 0, 0];

fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | ((flags as u64 & 0xf) << 52)
        | (((base as u64) >> 24) << 56)
}

impl Model {
    fn new(sels: &[u16; 6], vendor: Vendor) -> Model {
        let ram = Arc::new(GuestRam::new(RAM_SIZE).expect("guest RAM"));
        // GDT: 0x23 = flat 32-bit code, DPL 3; 0x2b = flat data, DPL 3.
        ram.write_u64(GDT + 0x20, descriptor(0, 0xfffff, 0xfb, 0xc))
            .unwrap();
        ram.write_u64(GDT + 0x28, descriptor(0, 0xfffff, 0xf3, 0xc))
            .unwrap();
        let [cs, ds, es, ss, fs, gs] = *sels;
        assert_eq!(
            (cs, ds, es, ss),
            (0x23, 0x2b, 0x2b, 0x2b),
            "unexpected native user selectors"
        );
        let mut st = CpuState::flat_protected(cs, ds);
        st.seg[seg::ES] = Segment::flat32(es, false);
        st.seg[seg::SS] = Segment::flat32(ss, false);
        for (s, sel) in [(seg::FS, fs), (seg::GS, gs)] {
            assert_eq!(sel, 0, "native FS/GS are expected to be null");
            st.seg[s] = Segment::default();
        }
        st.gdtr.base = GDT;
        st.gdtr.limit = 0x2f;
        st.rflags = 0x202;
        // Like Linux: no LDT.
        st.ldtr = Segment::default();
        // Paging maps exactly the pages the runner maps (user, writable),
        // and the GDT (supervisor), so stray accesses fault on both sides.
        let (pd, pt0, pt1) = (0x2000u64, 0x3000u64, 0x4000u64);
        ram.write_u32(pd, pt0 as u32 | 7).unwrap();
        ram.write_u32(pd + 4 * (CODE as u64 >> 22), pt1 as u32 | 7)
            .unwrap();
        ram.write_u32(pt0 + 4 * ((GDT >> 12) & 0x3ff), GDT as u32 | 3)
            .unwrap();
        // A TSS without an I/O bitmap (I/O map base beyond the limit), as
        // Linux gives a process that did not call ioperm().
        let tss = GDT + 0x1000;
        ram.write_u32(pt0 + 4 * (tss >> 12), tss as u32 | 3)
            .unwrap();
        ram.write_u16(tss + 0x66, 0x68).unwrap();
        st.tr = Segment {
            selector: 0x30,
            attr: popek_cpu::state::attr::P | 0xb,
            limit: 0x67,
            base: tss,
        };
        for page in [CODE, CODE + 0x1000, SCRATCH, STACK] {
            let i = (page as u64 >> 12) & 0x3ff;
            ram.write_u32(pt1 + 4 * i, page | 7).unwrap();
        }
        st.cr3 = pd;
        st.cr0 |= popek_cpu::state::cr::CR0_PG;
        st.vendor = vendor;
        let mut cpu = Cpu::new(ram);
        cpu.exception_bitmap = !0;
        Model { cpu, base: st }
    }

    fn run(&mut self, c: &Case, scratch0: &[u8], stack0: &[u8]) -> Outcome {
        let ram = self.cpu.ram().clone();
        let mut code = c.model_code.clone().unwrap_or_else(|| c.code.clone());
        code.push(0xf4); // HLT: #GP at CPL 3 ends the run.
        ram.write(c.start() as u64, &code).unwrap();
        ram.write(SCRATCH as u64, scratch0).unwrap();
        ram.write(STACK as u64, stack0).unwrap();
        let mut st = self.base.clone();
        for (i, r) in c.regs.iter().enumerate() {
            st.gpr[i] = *r as u64;
        }
        st.rflags = c.eflags as u64;
        st.rip = c.start() as u64;
        if c.model_code.is_some() {
            for s in [seg::DS, seg::ES, seg::SS] {
                st.seg[s].base = (SCRATCH - c.window) as u64;
            }
        }
        self.cpu.set_state(st);
        let exit = self.cpu.run(&mut NullBus, 200_000);
        let s = self.cpu.state();
        let eip = s.rip as u32;
        let fault = match exit {
            RunExit::Exception {
                vector: 13,
                error_code: Some(0),
                ..
            } if eip == c.model_end_ip() => None,
            RunExit::Exception {
                software: false, ..
            } => None,
            other => Some(format!("{other:?} at {eip:#x}")),
        };
        let exc = match exit {
            RunExit::Exception {
                vector: 13,
                error_code: Some(0),
                ..
            } if eip == c.model_end_ip() => None,
            RunExit::Exception {
                vector, error_code, ..
            } => Some((
                vector as u32,
                error_code.unwrap_or(0),
                eip,
                if vector == 14 { s.cr2 as u32 } else { 0 },
            )),
            _ => None,
        };
        let mut regs = [0u32; 8];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = s.gpr[i] as u32;
        }
        let eflags = s.rflags as u32;
        let mut page = vec![0u8; PAGE];
        ram.read(SCRATCH as u64, &mut page).unwrap();
        let scratch = diff(&page, scratch0);
        ram.read(STACK as u64, &mut page).unwrap();
        let stack = diff(&page, stack0);
        Outcome {
            regs,
            eflags,
            eip,
            scratch,
            stack,
            fault,
            exc,
        }
    }
}

fn diff(page: &[u8], init: &[u8]) -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    for i in (0..PAGE).step_by(4) {
        let a = u32::from_le_bytes(page[i..i + 4].try_into().unwrap());
        let b = u32::from_le_bytes(init[i..i + 4].try_into().unwrap());
        if a != b {
            v.push((i as u32, a));
        }
    }
    v
}

// ---------------------------------------------------------------------------
// The native side

const RUNNER_SRC: &str = include_str!("differential/runner.c");

fn build_runner(addr16: bool) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("popek-cpu-differential");
    std::fs::create_dir_all(&dir).unwrap();
    let id = format!("{}-{}", std::process::id(), addr16 as u8);
    let src = dir.join(format!("runner-{id}.c"));
    let exe = dir.join(format!("runner-{id}"));
    std::fs::write(&src, RUNNER_SRC).unwrap();
    let out = Command::new("gcc")
        .args([
            "-m32",
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-o",
        ])
        .arg(&exe)
        .arg(&src)
        .output();
    match out {
        Ok(o) if o.status.success() => exe,
        Ok(o) => panic!(
            "differential: `gcc -m32 -ffreestanding -nostdlib -static` could not build the native runner.\n\
             Install Debian's `gcc` (its x86-64 compiler also targets i386 for freestanding code); \
             if linking still fails, also install `gcc-multilib` (and `libc6-dev-i386`).\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("differential: cannot run gcc ({e}); install Debian's `gcc` package (and `gcc-multilib` if -m32 fails)"),
    }
}

struct NativeRun {
    sels: [u16; 6],
    /// Per case index: the outcome, or why it is missing.
    results: HashMap<u64, Outcome>,
    faults: Vec<(u64, String)>,
}

fn run_native(exe: &Path, cases: &[Case]) -> NativeRun {
    let dir = exe.parent().unwrap();
    let input = dir.join(format!(
        "batch-{}.bin",
        exe.file_name().unwrap().to_string_lossy()
    ));
    let mut results = HashMap::new();
    let mut faults = Vec::new();
    let mut sels = [0u16; 6];
    let mut start = 0;
    while start < cases.len() {
        let batch = &cases[start..cases.len().min(start + 20_000)];
        let mut buf = Vec::new();
        buf.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        for c in batch {
            let mut w = vec![c.code.len() as u32];
            w.extend_from_slice(&c.regs);
            w.extend_from_slice(&[c.eflags, c.seed, c.kind, c.code_off]);
            for x in w {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            buf.extend_from_slice(&c.code);
            buf.resize(buf.len().next_multiple_of(4), 0);
        }
        std::fs::write(&input, &buf).unwrap();
        let out = Command::new(exe).arg(&input).output().unwrap_or_else(|e| {
            panic!(
                "differential: cannot run the native i386 runner ({e}); the kernel needs \
                     IA32 emulation (CONFIG_IA32_EMULATION)"
            )
        });
        let words: Vec<u32> = out
            .stdout
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if words.len() < 7 || words[0] != 0x706f_7065 {
            panic!(
                "differential: the native i386 runner did not start ({}); the kernel needs IA32 \
                 emulation (CONFIG_IA32_EMULATION)",
                out.status
            );
        }
        for (i, s) in sels.iter_mut().enumerate() {
            *s = words[1 + i] as u16;
        }
        let mut p = 7;
        let mut done = 0;
        while p < words.len() {
            let idx = words[p] as usize;
            let mut regs = [0u32; 8];
            regs.copy_from_slice(&words[p + 1..p + 9]);
            let eflags = words[p + 9];
            let f = &words[p + 10..p + 15];
            let exc = (f[0] != 0).then(|| (f[1], f[2], f[3], if f[1] == 14 { f[4] } else { 0 }));
            p += 15;
            let mut pages = [Vec::new(), Vec::new()];
            for pg in pages.iter_mut() {
                let n = words[p] as usize;
                p += 1;
                for k in 0..n {
                    pg.push((words[p + 2 * k], words[p + 2 * k + 1]));
                }
                p += 2 * n;
            }
            let [scratch, stack] = pages;
            let c = &batch[idx];
            results.insert(
                c.index,
                Outcome {
                    regs,
                    eflags,
                    eip: c.end_ip(),
                    scratch,
                    stack,
                    fault: None,
                    exc,
                },
            );
            done = idx + 1;
        }
        if done < batch.len() {
            // The case at `done` killed the runner: note it, go on after it.
            faults.push((
                batch[done].index,
                format!("native runner died: {}", out.status),
            ));
            start += done + 1;
        } else {
            start += batch.len();
        }
    }
    let _ = std::fs::remove_file(&input);
    NativeRun {
        sels,
        results,
        faults,
    }
}

// ---------------------------------------------------------------------------
// Comparison and report

fn disasm(code: &[u8], ip: u32) -> String {
    let mut d = Decoder::with_ip(32, code, ip as u64, DecoderOptions::NONE);
    let mut f = IntelFormatter::new();
    let mut s = String::new();
    for ins in d.iter() {
        let mut t = String::new();
        f.format(&ins, &mut t);
        let start = (ins.ip() - ip as u64) as usize;
        let bytes: String = code[start..start + ins.len()]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let _ = writeln!(s, "    {:08x}  {:<24} {}", ins.ip(), bytes, t);
    }
    s
}

const FLAG_NAMES: [&str; 12] = [
    "CF", "1", "PF", "3", "AF", "5", "ZF", "SF", "TF", "IF", "DF", "OF",
];

const NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];

/// Differences between the native (`n`) and model (`m`) outcomes.
fn compare(c: &Case, n: &Outcome, m: &Outcome, mask: u32) -> Vec<String> {
    let mut d = Vec::new();
    if let Some(f) = &m.fault {
        d.push(format!("model did not reach the end: {f}"));
    }
    if n.exc != m.exc {
        let f = |e: Option<(u32, u32, u32, u32)>| match e {
            None => "none (reached the end)".to_string(),
            Some((v, err, eip, cr2)) => {
                format!("vector {v} error {err:#x} at {eip:#x} cr2 {cr2:#x}")
            }
        };
        d.push(format!("exception: native {} model {}", f(n.exc), f(m.exc)));
    }
    // The kernel reports EFLAGS as pushed for the fault, with RF set.
    let mask = if n.exc.is_some() { mask | fl::RF } else { mask };
    for (i, name) in NAMES.iter().enumerate() {
        if n.regs[i] != m.regs[i] {
            d.push(format!(
                "{name}: native {:#010x} model {:#010x}",
                n.regs[i], m.regs[i]
            ));
        }
    }
    if (n.eflags ^ m.eflags) & !mask != 0 {
        d.push(format!(
            "eflags: native {:#010x} model {:#010x} (differ {:#x}, masked {:#x})",
            n.eflags,
            m.eflags,
            n.eflags ^ m.eflags,
            mask
        ));
    }
    if m.fault.is_none() && m.exc.is_none() && m.eip != c.model_end_ip() {
        d.push(format!(
            "eip: expected {:#x} model {:#x}",
            c.model_end_ip(),
            m.eip
        ));
    }
    for (name, a, b) in [
        ("scratch", &n.scratch, &m.scratch),
        ("stack", &n.stack, &m.stack),
    ] {
        if a != b {
            let ma: HashMap<u32, u32> = a.iter().copied().collect();
            let mb: HashMap<u32, u32> = b.iter().copied().collect();
            let mut offs: Vec<u32> = ma.keys().chain(mb.keys()).copied().collect();
            offs.sort();
            offs.dedup();
            let mut parts = Vec::new();
            for o in offs {
                let (x, y) = (ma.get(&o), mb.get(&o));
                if x != y {
                    let f = |v: Option<&u32>| {
                        v.map_or("unchanged".to_string(), |v| format!("{v:#010x}"))
                    };
                    parts.push(format!("+{o:#05x}: native {} model {}", f(x), f(y)));
                }
            }
            d.push(format!("{name} page: {}", parts.join(", ")));
        }
    }
    d
}

/// Appends a case's listing, inputs, both outcomes and differences.
fn show(report: &mut String, seed: u64, c: &Case, n: &Outcome, m: &Outcome, d: &[String]) {
    let _ = writeln!(
        report,
        "--- case {} (POPEK_DIFF_SEED={seed:#x} POPEK_DIFF_ONLY={})",
        c.index, c.index
    );
    report.push_str(&disasm(&c.code, c.start()));
    if let Some(mc) = &c.model_code {
        let _ = writeln!(
            report,
            "  model code (DS/ES/SS base {:#x}):",
            SCRATCH - c.window
        );
        report.push_str(&disasm(mc, c.start()));
    }
    let regs = |r: &[u32; 8]| {
        (0..8)
            .map(|i| format!("{}={:#x}", NAMES[i], r[i]))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        report,
        "  in:  {} eflags={:#x} page seed={:#x} kind={}",
        regs(&c.regs),
        c.eflags,
        c.seed,
        c.kind
    );
    for (who, o) in [("native", n), ("model ", m)] {
        let _ = writeln!(report, "  {who}: {} eflags={:#x}", regs(&o.regs), o.eflags);
    }
    for line in d {
        let _ = writeln!(report, "  DIFF {line}");
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    Some(if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("{name}: bad number"))
    } else {
        v.parse().unwrap_or_else(|_| panic!("{name}: bad number"))
    })
}

#[test]
fn differential_against_host_cpu() {
    let n_cases = env_u64("POPEK_DIFF_CASES").unwrap_or(20_000);
    run_differential(false, n_cases);
}

/// The same, with the model's memory operands in 16-bit addressing form
/// (`[bx+si+disp]`, wrapping at 64 KiB) and DS/ES/SS based so that they reach
/// the bytes the native code addresses with 32-bit absolute operands.
#[test]
fn differential_16bit_addressing() {
    let n_cases = env_u64("POPEK_DIFF_CASES").unwrap_or(20_000) / 4;
    run_differential(true, n_cases);
}

fn run_differential(addr16: bool, n_cases: u64) {
    if !cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
        eprintln!("differential: not an x86 host, skipped");
        return;
    }
    let tag = if addr16 {
        "differential (16-bit addressing)"
    } else {
        "differential"
    };
    let seed = env_u64("POPEK_DIFF_SEED").unwrap_or(0x706f_7065_6b00_0001);
    let only = env_u64("POPEK_DIFF_ONLY");
    let loose = env_u64("POPEK_DIFF_LOOSE").unwrap_or(0) != 0;
    let record = std::env::var_os("POPEK_DIFF_RECORD").map(PathBuf::from);
    let mut recorder = record.as_ref().filter(|_| !addr16).map(|_| Recorder::new());
    let stats = env_u64("POPEK_DIFF_STATS").unwrap_or(0) != 0;
    let show_all = env_u64("POPEK_DIFF_SHOW").unwrap_or(0) != 0;
    let mut histogram: HashMap<String, u64> = HashMap::new();
    let exe = build_runner(addr16);
    let codes = Codes::new();

    let mut total = 0u64;
    let mut mismatches = 0u64;
    let mut only_undef = 0u64;
    let mut vectors: HashMap<u32, u64> = HashMap::new();
    let mut undef_by: HashMap<(Option<Mnemonic>, &str), u64> = HashMap::new();
    let mut native_faults = Vec::new();
    let mut report = String::new();
    let mut model: Option<Model> = None;
    // Chunks bound memory for long runs; the native side of a chunk runs on
    // another thread while the model works.
    let chunk = 50_000u64;
    let indices: Vec<u64> = match only {
        Some(i) => vec![i],
        None => (0..n_cases).collect(),
    };
    for part in indices.chunks(chunk as usize) {
        let cases: Vec<Case> = part
            .iter()
            .map(|&i| generate(&codes, seed, i, addr16))
            .collect();
        if stats {
            for c in &cases {
                let mut d = Decoder::with_ip(32, &c.code, CODE as u64, DecoderOptions::NONE);
                for ins in d.iter() {
                    *histogram
                        .entry(format!("{:?}", ins.mnemonic()))
                        .or_insert(0u64) += 1;
                }
            }
        }
        let native = std::thread::scope(|s| {
            let h = s.spawn(|| run_native(&exe, &cases));
            h.join().unwrap()
        });
        native_faults.extend(native.faults.iter().cloned());
        let m = model.get_or_insert_with(|| Model::new(&native.sels, Vendor::host()));
        for c in &cases {
            let Some(n) = native.results.get(&c.index) else {
                continue;
            };
            let scratch0 = fill(c.seed, c.kind);
            let stack0 = fill(c.seed ^ 0x9e37_79b9, c.kind);
            let mo = m.run(c, &scratch0, &stack0);
            total += 1;
            if let Some((v, ..)) = n.exc {
                *vectors.entry(v).or_insert(0u64) += 1;
            }
            if let Some(r) = recorder.as_mut() {
                r.consider(c, n, &native.sels, &scratch0, &stack0);
            }
            let d = compare(c, n, &mo, if loose { c.undef } else { 0 });
            if show_all {
                show(&mut report, seed, c, n, &mo, &d);
            }
            if d.is_empty() {
                let x = n.eflags ^ mo.eflags;
                if x & !fl::RF != 0 {
                    only_undef += 1;
                    for (b, name) in FLAG_NAMES.iter().enumerate() {
                        if x & (1 << b) != 0 {
                            *undef_by.entry((c.undef_src[b], *name)).or_insert(0) += 1;
                        }
                    }
                }
                continue;
            }
            mismatches += 1;
            if mismatches <= env_u64("POPEK_DIFF_MAX_SHOW").unwrap_or(20) {
                show(&mut report, seed, c, n, &mo, &d);
            }
        }
    }
    eprint!("{report}");
    for (i, why) in native_faults.iter().take(10) {
        eprintln!(
            "differential: case {i}: {why} (a generator bug: it must not emit faulting code)"
        );
        let c = generate(&codes, seed, *i, addr16);
        eprint!("{}", disasm(&c.code, c.start()));
    }
    eprintln!("{tag}: {total} sequences, {mismatches} mismatches (seed {seed:#x})");
    let mut v: Vec<_> = vectors.into_iter().collect();
    v.sort();
    let v: Vec<String> = v.iter().map(|(v, n)| format!("vector {v}: {n}")).collect();
    eprintln!(
        "{tag}: sequences ending in an exception (compared too): {}",
        v.join(", ")
    );
    eprintln!(
        "{tag}: {only_undef} sequences differed only in flags the SDM leaves undefined (masked)"
    );
    let mut by: Vec<_> = undef_by.into_iter().collect();
    by.sort_by_key(|b| std::cmp::Reverse(b.1));
    for ((mn, flag), n) in by.iter().take(24) {
        eprintln!("differential:   {n:8} × {flag} after {mn:?}");
    }
    if stats {
        let mut h: Vec<_> = histogram.into_iter().collect();
        h.sort_by_key(|b| std::cmp::Reverse(b.1));
        let line: Vec<String> = h.iter().map(|(m, n)| format!("{m} {n}")).collect();
        eprintln!("differential: generated instructions: {}", line.join(", "));
    }
    println!(
        "{tag}: {total} sequences, {mismatches} mismatches (profile {}, host {})",
        Vendor::host(),
        host_cpu_description()
    );
    if let (Some(r), Some(path)) = (recorder, record) {
        r.write(&path);
    }
    let _ = std::fs::remove_file(&exe);
    let _ = std::fs::remove_file(exe.with_extension("c"));
    assert!(
        native_faults.is_empty(),
        "{} generated sequences faulted natively",
        native_faults.len()
    );
    assert_eq!(mismatches, 0, "the model disagrees with the host CPU");
}

// ---------------------------------------------------------------------------
// Reference vectors: the profile that is not the host's, held to silicon
// recorded elsewhere.

/// Where the committed vector files are (`<vendor>-<source>.vec.gz`).
fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential/vectors")
}

/// Collects, while a differential run goes on, the sequences whose outcome
/// depends on the vendor profile (the two profiles of the model disagree
/// on them) with what the host produced: `POPEK_DIFF_RECORD=FILE`.
/// `POPEK_DIFF_RECORD_MODEL=intel|amd` records that profile of the model
/// instead of the host (a regression lock where no such silicon is at
/// hand; the header says so).
struct Recorder {
    models: Option<[Model; 2]>,
    from_model: Option<Vendor>,
    kept: Vec<(Case, Outcome)>,
}

impl Recorder {
    fn new() -> Recorder {
        let from_model = std::env::var("POPEK_DIFF_RECORD_MODEL")
            .ok()
            .map(|v| v.parse().expect("POPEK_DIFF_RECORD_MODEL: intel or amd"));
        Recorder {
            models: None,
            from_model,
            kept: Vec::new(),
        }
    }

    fn consider(
        &mut self,
        c: &Case,
        native: &Outcome,
        sels: &[u16; 6],
        scratch0: &[u8],
        stack0: &[u8],
    ) {
        if native.exc.is_none() && native.eip != c.end_ip() {
            return;
        }
        let models = self.models.get_or_insert_with(|| {
            [
                Model::new(sels, Vendor::Intel),
                Model::new(sels, Vendor::Amd),
            ]
        });
        let i = models[0].run(c, scratch0, stack0);
        let a = models[1].run(c, scratch0, stack0);
        if i.fault.is_some() || a.fault.is_some() || compare(c, &i, &a, 0).is_empty() {
            return;
        }
        let out = match self.from_model {
            Some(Vendor::Intel) => i,
            Some(Vendor::Amd) => a,
            None => native.clone(),
        };
        self.kept.push((c.clone(), out));
    }

    fn write(self, path: &Path) {
        let (vendor, source) = match self.from_model {
            Some(v) => (
                v,
                std::env::var("POPEK_DIFF_RECORD_SOURCE")
                    .unwrap_or_else(|_| "the popek model (not silicon)".to_string()),
            ),
            None => (Vendor::host(), host_cpu_description()),
        };
        let bitscan = if popek_cpu::vendor::amd_bitscan_keeps_flags() {
            "keeps"
        } else {
            "clears"
        };
        let mut out = format!(
            "popek differential vectors v1\nvendor {vendor}\nsource {source}\namd-bitscan {bitscan}\ncases {}\n\n",
            self.kept.len()
        )
        .into_bytes();
        for (c, o) in &self.kept {
            let mut w: Vec<u32> = vec![c.index as u32, c.code.len() as u32];
            w.extend_from_slice(&c.regs);
            w.extend_from_slice(&[c.eflags, c.seed, c.kind, c.code_off]);
            w.extend_from_slice(&o.regs);
            w.push(o.eflags);
            match o.exc {
                Some((v, e, ip, cr2)) => w.extend_from_slice(&[1, v, e, ip, cr2]),
                None => w.extend_from_slice(&[0, 0, 0, 0, 0]),
            }
            let h = memory_hash(o);
            w.extend_from_slice(&[h as u32, (h >> 32) as u32]);
            for x in w {
                out.extend_from_slice(&x.to_le_bytes());
            }
            out.extend_from_slice(&c.code);
        }
        let f = std::fs::File::create(path).expect("vector file");
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &out).expect("vector file");
        gz.finish().expect("vector file");
        eprintln!(
            "differential: {} vendor-dependent sequences recorded to {}",
            self.kept.len(),
            path.display()
        );
    }
}

/// Reads a vector file's little-endian words and bytes.
struct Cursor<'a> {
    raw: &'a [u8],
    p: usize,
}

impl Cursor<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let b = &self.raw[self.p..self.p + n];
        self.p += n;
        b
    }
    fn word(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().unwrap())
    }
    fn words<const N: usize>(&mut self) -> [u32; N] {
        std::array::from_fn(|_| self.word())
    }
}

/// A vector file: its header and cases (outcomes with the memory changes
/// as a hash, see `memory_hash`).
struct Vectors {
    vendor: Vendor,
    source: String,
    /// Whether AMD's BSF/BSR kept the flags but ZF where they were
    /// recorded (Zen 3; header `amd-bitscan keeps|clears`, absent in files
    /// recorded where they clear them, as Zen 4 does).
    amd_bitscan_keeps: bool,
    cases: Vec<(Case, Outcome, u64)>,
}

/// FNV-1a over the changed dwords of both pages: vector files keep this
/// instead of the changes themselves (a fifth of the size).
fn memory_hash(o: &Outcome) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for pg in [&o.scratch, &o.stack] {
        for w in std::iter::once(pg.len() as u32).chain(pg.iter().flat_map(|(a, b)| [*a, *b])) {
            for b in w.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    h
}

fn read_vectors(path: &Path) -> Vectors {
    use std::io::Read;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("vector file"))
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let split = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("vector header");
    let header = String::from_utf8_lossy(&raw[..split]).to_string();
    let field = |k: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("{}: no '{k}' in the header", path.display()))
    };
    assert_eq!(header.lines().next(), Some("popek differential vectors v1"));
    let vendor: Vendor = field("vendor ").parse().expect("vendor");
    let source = field("source ");
    let n: usize = field("cases ").parse().expect("cases");
    let amd_bitscan_keeps = header.lines().any(|l| l.trim() == "amd-bitscan keeps");
    let mut r = Cursor {
        raw: &raw,
        p: split + 2,
    };
    let mut cases = Vec::with_capacity(n);
    for _ in 0..n {
        let index = r.word() as u64;
        let len = r.word() as usize;
        let regs = r.words::<8>();
        let [eflags, seed, kind, code_off] = r.words::<4>();
        let oregs = r.words::<8>();
        let oflags = r.word();
        let e = r.words::<5>();
        let [lo, hi] = r.words::<2>();
        let c = Case {
            index,
            code: r.bytes(len).to_vec(),
            regs,
            eflags,
            seed,
            kind,
            undef: 0,
            undef_src: [None; 12],
            model_code: None,
            window: 0,
            code_off,
        };
        let o = Outcome {
            regs: oregs,
            eflags: oflags,
            eip: c.end_ip(),
            scratch: Vec::new(),
            stack: Vec::new(),
            fault: None,
            exc: (e[0] != 0).then_some((e[1], e[2], e[3], e[4])),
        };
        cases.push((c, o, lo as u64 | (hi as u64) << 32));
    }
    let p = r.p;
    assert_eq!(p, raw.len(), "{}: trailing bytes", path.display());
    Vectors {
        vendor,
        source,
        amd_bitscan_keeps,
        cases,
    }
}

/// Each profile against what its vendor's silicon did with the sequences
/// on which the two profiles differ, recorded on named processors (and
/// committed), whatever the host: the host's own profile is also held to
/// the host live by the tests above.
#[test]
fn vendor_profiles_match_recorded_vectors() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .expect("the committed vector directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".vec.gz"))
        .collect();
    files.sort();
    let mut seen = Vec::new();
    for f in &files {
        let v = read_vectors(f);
        let mut model = Model::new(&LINUX_USER_SELS, v.vendor);
        model
            .cpu
            .set_amd_bitscan_keeps_flags(Some(v.amd_bitscan_keeps));
        let mut report = String::new();
        let mut bad = 0;
        for (c, want, mem) in &v.cases {
            let scratch0 = fill(c.seed, c.kind);
            let stack0 = fill(c.seed ^ 0x9e37_79b9, c.kind);
            let mut got = model.run(c, &scratch0, &stack0);
            let mut d = Vec::new();
            if memory_hash(&got) != *mem {
                d.push("the scratch or stack page differs (the file keeps a hash)".to_string());
            }
            got.scratch.clear();
            got.stack.clear();
            d.extend(compare(c, want, &got, 0));
            if !d.is_empty() {
                bad += 1;
                if bad <= 10 {
                    show(&mut report, 0, c, want, &got, &d);
                }
            }
        }
        eprint!("{report}");
        println!(
            "vectors {}: profile {}, {} sequences recorded on {}, {bad} mismatches",
            f.file_name().unwrap().to_string_lossy(),
            v.vendor,
            v.cases.len(),
            v.source
        );
        assert!(v.cases.len() >= 100, "{}: too few vectors", f.display());
        assert_eq!(
            bad,
            0,
            "profile {} disagrees with {}",
            v.vendor,
            f.display()
        );
        seen.push(v.vendor);
    }
    for vendor in Vendor::ALL {
        assert!(
            seen.contains(&vendor),
            "no reference vectors for the {vendor} profile in {}",
            vectors_dir().display()
        );
    }
}
