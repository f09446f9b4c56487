//! Decoding guest code into blocks of pre-resolved instructions.
//!
//! `iced-x86` decodes the bytes; each instruction is then turned into a
//! `DecodedInsn` with its handler chosen once and its operands resolved to
//! register numbers, a memory-operand description and immediates, so the
//! execution loop does no decoding work. Blocks are cached by physical
//! address and CS size, and end at control transfers, instructions that
//! change how later code must be decoded or checked, page ends and a size cap.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};

use crate::bus::Bus;
use crate::cpu::{Cpu, MAX_BLOCK};
use crate::exception::{Exc, Res};
use crate::exec::{handler_for, Handler};
use crate::facts;

/// Operand kinds of a decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpK {
    /// No operand.
    None,
    /// General register `reg` (low byte, or bits 8–15 when `hi`).
    Reg,
    /// Memory at the instruction's memory operand.
    Mem,
    /// Immediate in `imm`.
    Imm,
    /// Something else (segment register, control register, far pointer…):
    /// the handler looks at `insn`.
    Other,
}

/// One resolved operand.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    /// Kind.
    pub kind: OpK,
    /// GPR number for `Reg`.
    pub reg: u8,
    /// AH/CH/DH/BH.
    pub hi: bool,
    /// Size in bytes.
    pub size: u8,
}

const NO_OP: Operand = Operand {
    kind: OpK::None,
    reg: 0,
    hi: false,
    size: 0,
};

/// No base or index register.
pub const NO_REG: u8 = 0xff;

/// A decoded instruction ready to execute.
#[derive(Clone, Debug)]
pub struct DecodedInsn {
    /// The routine that executes it.
    pub handler: Handler,
    /// Operands 0–2.
    pub ops: [Operand; 3],
    /// Length in bytes.
    pub len: u8,
    /// Operand size (2 or 4; 1 for byte forms) of operand 0, else the
    /// instruction's operand-size attribute.
    pub osize: u8,
    /// Address size (2 or 4).
    pub asize: u8,
    /// Segment of the memory operand (after overrides).
    pub mseg: u8,
    /// Base register of the memory operand or `NO_REG`.
    pub base: u8,
    /// Index register of the memory operand or `NO_REG`.
    pub index: u8,
    /// Index scale (1, 2, 4, 8).
    pub scale: u8,
    /// Displacement.
    pub disp: u32,
    /// First immediate (sign- or zero-extended as the encoding defines).
    pub imm: u64,
    /// Operand 0 is memory that the instruction reads and then writes: its
    /// read is made with write intent (a #PF then reports a write, as on
    /// hardware).
    pub rmw: bool,
    /// The full iced instruction, for handlers that need more.
    pub insn: Instruction,
}

/// A run of decoded instructions at consecutive addresses.
#[derive(Debug)]
pub struct Block {
    /// EIP of the first instruction (branch targets depend on it).
    pub ip: u64,
    /// The instructions.
    pub insns: Vec<DecodedInsn>,
    /// False for a block that must not be cached (an instruction crossing a
    /// page boundary).
    pub cacheable: bool,
    /// Length of the block's code in bytes.
    pub len: u32,
}

/// GPR number and high-byte flag of an iced register, if it is a GPR.
pub fn gpr(r: Register) -> Option<(u8, bool, u8)> {
    let n = r as u32;
    if r.is_gpr8() {
        let i = n - Register::AL as u32;
        return Some(match i {
            0..=3 => (i as u8, false, 1),
            4..=7 => ((i - 4) as u8, true, 1),
            _ => ((i - 4) as u8, false, 1),
        });
    }
    if r.is_gpr16() {
        return Some(((n - Register::AX as u32) as u8, false, 2));
    }
    if r.is_gpr32() {
        return Some(((n - Register::EAX as u32) as u8, false, 4));
    }
    if r.is_gpr64() {
        return Some(((n - Register::RAX as u32) as u8, false, 8));
    }
    None
}

/// Segment register number of an iced register.
pub fn sreg(r: Register) -> Option<u8> {
    Some(match r {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS => 4,
        Register::GS => 5,
        _ => return None,
    })
}

fn imm_size(k: OpKind) -> u8 {
    match k {
        OpKind::Immediate8 => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        _ => 8,
    }
}

/// Builds the resolved form of one iced instruction.
pub fn resolve(insn: &Instruction, code_size: u8) -> DecodedInsn {
    let mut ops = [NO_OP; 3];
    let mut imm = 0;
    let mut have_imm = false;
    for (i, op) in ops
        .iter_mut()
        .enumerate()
        .take(insn.op_count().min(3) as usize)
    {
        let k = insn.op_kind(i as u32);
        *op = match k {
            OpKind::Register => match gpr(insn.op_register(i as u32)) {
                Some((reg, hi, size)) => Operand {
                    kind: OpK::Reg,
                    reg,
                    hi,
                    size,
                },
                None => Operand {
                    kind: OpK::Other,
                    ..NO_OP
                },
            },
            OpKind::Memory => Operand {
                kind: OpK::Mem,
                reg: 0,
                hi: false,
                size: insn.memory_size().size() as u8,
            },
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate32to64
            | OpKind::Immediate8to64
            | OpKind::Immediate64 => {
                if !have_imm {
                    imm = insn.immediate(i as u32);
                    have_imm = true;
                }
                Operand {
                    kind: OpK::Imm,
                    reg: 0,
                    hi: false,
                    size: imm_size(k),
                }
            }
            _ => Operand {
                kind: OpK::Other,
                ..NO_OP
            },
        };
    }
    let asize = match insn.memory_base().size().max(insn.memory_index().size()) {
        2 => 2,
        4 => 4,
        8 => 8,
        _ => match insn.memory_displ_size() {
            2 => 2,
            8 => 8,
            4 => 4,
            _ => code_size,
        },
    };
    let osize = if ops[0].kind == OpK::Reg || ops[0].kind == OpK::Mem {
        ops[0].size
    } else {
        crate::exec::op_size(insn, code_size)
    };
    let reg_or_none = |r: Register| gpr(r).map(|g| g.0).unwrap_or(NO_REG);
    DecodedInsn {
        handler: handler_for(insn),
        ops,
        len: insn.len() as u8,
        osize,
        asize,
        mseg: sreg(insn.memory_segment()).unwrap_or(3),
        base: reg_or_none(insn.memory_base()),
        index: reg_or_none(insn.memory_index()),
        scale: insn.memory_index_scale() as u8,
        disp: insn.memory_displacement32(),
        // Near branches keep their absolute target here, so the handler
        // does not ask iced at run time.
        imm: if matches!(
            insn.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) {
            insn.near_branch_target()
        } else {
            imm
        },
        rmw: ops[0].kind == OpK::Mem && facts::is_rmw(insn.mnemonic()),
        insn: *insn,
    }
}

/// [`resolve`] for `cpu`: a CPU sharing memory with CPUs on other threads
/// runs LOCKed instructions atomically (`exec::locked`).
fn resolve_for(cpu: &Cpu, insn: &Instruction, code_size: u8) -> DecodedInsn {
    let mut d = resolve(insn, code_size);
    if cpu.shares_code() && crate::exec::locked::needs_lock(insn) {
        d.handler = crate::exec::locked::locked;
    }
    d
}

/// Decodes the block starting at linear `lin` (physical `phys`).
pub(crate) fn decode_block(cpu: &mut Cpu, bus: &mut dyn Bus, lin: u32, phys: u64) -> Res<Block> {
    let code_size = cpu.code_size();
    let bitness = if code_size == 4 { 32 } else { 16 };
    let page_left = 0x1000 - (phys & 0xfff) as usize;
    let mut bytes = [0u8; 4096 + 16];
    let ram_ok = phys + page_left as u64 <= cpu.ram_size;
    if ram_ok {
        cpu.ram
            .read(phys, &mut bytes[..page_left])
            .map_err(|_| Exc::gp(0))?;
    } else {
        for (i, b) in bytes[..page_left].iter_mut().enumerate() {
            *b = cpu.read_phys(bus, phys + i as u64, 1)? as u8;
        }
    }
    let ip = cpu.st.rip;
    let mut insns = Vec::new();
    let mut dec = Decoder::with_ip(bitness, &bytes[..page_left], ip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    let mut consumed = 0usize;
    while insns.len() < MAX_BLOCK {
        // Instructions must not run past the CS limit... the handler checks
        // EIP against the limit at execution time via `fetch_check`.
        let left = page_left - consumed;
        if left < 15 {
            // Might cross into the next page: decode with bytes from it.
            let mut buf = [0u8; 15];
            buf[..left].copy_from_slice(&bytes[consumed..page_left]);
            let mut d2 = Decoder::with_ip(
                bitness,
                &buf[..left],
                ip + consumed as u64,
                DecoderOptions::NONE,
            );
            d2.decode_out(&mut insn);
            if insn.is_invalid() && d2.last_error() == iced_x86::DecoderError::NoMoreBytes {
                if !insns.is_empty() {
                    break;
                }
                // A single instruction spanning the page boundary.
                let next_lin = lin.wrapping_add(left as u32);
                let next_phys = cpu.translate_fetch(bus, next_lin)?;
                for (i, b) in buf[left..].iter_mut().enumerate() {
                    *b = cpu.read_phys(bus, next_phys + i as u64, 1)? as u8;
                }
                let mut d3 = Decoder::with_ip(bitness, &buf, ip, DecoderOptions::NONE);
                d3.decode_out(&mut insn);
                let d = resolve_for(cpu, &insn, code_size);
                return Ok(Block {
                    ip,
                    len: d.len as u32,
                    insns: vec![d],
                    cacheable: false,
                });
            }
        } else {
            dec.set_position(consumed).map_err(|_| Exc::gp(0))?;
            dec.set_ip(ip + consumed as u64);
            dec.decode_out(&mut insn);
        }
        consumed += insn.len().max(1);
        let d = resolve_for(cpu, &insn, code_size);
        let ends = ends_block(&insn);
        insns.push(d);
        // The block also ends where IP wraps (at 64 KiB in 16-bit code):
        // the next instruction is at CS:0, not at the next linear byte.
        let ip_end = if code_size == 4 { 1u64 << 32 } else { 1 << 16 };
        if ends || consumed >= page_left || ip + consumed as u64 >= ip_end {
            break;
        }
    }
    Ok(Block {
        ip,
        insns,
        cacheable: true,
        len: consumed as u32,
    })
}

/// Instructions after which the block must end: control flow, and anything
/// that may change mode, privilege, paging, the interrupt flag or code.
fn ends_block(insn: &Instruction) -> bool {
    use iced_x86::Mnemonic::*;
    if insn.is_invalid() || insn.flow_control() != FlowControl::Next {
        return true;
    }
    matches!(insn.mnemonic(), Mov | Pop | Lds | Les | Lfs | Lgs | Lss)
        && insn.op0_kind() == OpKind::Register
        && insn.op0_register().is_segment_register()
        || insn.op0_kind() == OpKind::Register && insn.op0_register().is_cr()
        || matches!(
            insn.mnemonic(),
            Popf | Popfd
                | Sti
                | Cli
                | Lgdt
                | Lidt
                | Lldt
                | Ltr
                | Lmsw
                | Clts
                | Invlpg
                | Wrmsr
                | Hlt
                | In
                | Out
                | Insb
                | Insw
                | Insd
                | Outsb
                | Outsw
                | Outsd
                | Fninit
                | Frstor
                | Fxrstor
                | Cpuid
                | Wbinvd
                | Invd
                | Rdmsr
                | Rdtsc
        )
}
