//! Stack instructions: PUSH/POP (including segment registers), PUSHA/POPA,
//! PUSHF/POPF with their privilege rules, ENTER/LEAVE.

use iced_x86::OpKind;

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::decode::{sreg, DecodedInsn, OpK};
use crate::exception::{Exc, Res};
use crate::flags::{size_mask, FlagOp};
use crate::hooks::SensitiveKind;
use crate::state::{flags::*, seg};

type R = Res;

/// Operand size of PUSH/POP-class instructions.
fn stack_op_size(d: &DecodedInsn) -> u8 {
    match crate::facts::operand_size(d.insn.code()) {
        16 => 2,
        32 => 4,
        _ => {
            if d.ops[0].kind == OpK::Reg || d.ops[0].kind == OpK::Mem {
                d.ops[0].size
            } else if d.insn.code_size() == iced_x86::CodeSize::Code16 {
                2
            } else {
                4
            }
        }
    }
}

pub(crate) fn push(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    let v = match d.insn.op0_kind() {
        OpKind::Register if d.insn.op0_register().is_segment_register() => {
            let s = sreg(d.insn.op0_register()).unwrap_or(0) as usize;
            let sel = c.st.seg[s].selector as u64;
            if s == seg::CS || s == seg::SS {
                c.note_sensitive(bus, SensitiveKind::ReadSegment, s as u64, sel);
            }
            sel
        }
        // PUSH ESP pushes the value before the push.
        _ => c.rd(bus, d, 0)? & size_mask(size),
    };
    if d.insn.op0_register().is_segment_register()
        && size == 4
        && c.vendor() == crate::vendor::Vendor::Intel
    {
        // Intel processors write only the low 16 bits of the slot; AMD
        // processors write the selector zero-extended.
        let ss = c.stack_size();
        let sp = c.gr(4, ss).wrapping_sub(4) & size_mask(ss);
        c.seg_lin(seg::SS, sp as u32, 4, true)?;
        c.write_mem(bus, seg::SS, sp as u32, 2, v)?;
        c.sr(4, ss, sp);
        return Ok(());
    }
    c.push(bus, size, v)
}

pub(crate) fn pop(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    if d.insn.op0_register().is_segment_register() {
        let s = sreg(d.insn.op0_register()).unwrap_or(0) as usize;
        let v = c.peek_stack(bus, 0, size)? as u16;
        c.load_seg(bus, s, v)?;
        let ss = c.stack_size();
        let sp = c.gr(4, ss) + size as u64;
        c.sr(4, ss, sp);
        return Ok(());
    }
    let v = c.peek_stack(bus, 0, size)?;
    let ss = c.stack_size();
    let sp = c.gr(4, ss);
    // ESP is incremented before a memory destination's address is formed.
    c.sr(4, ss, sp.wrapping_add(size as u64));
    if let Err(e) = c.wr(bus, d, 0, v) {
        c.sr(4, ss, sp);
        return Err(e);
    }
    Ok(())
}

/// Runs `f`; if it faults, ESP is put back, so that an instruction that
/// pushes several values can be restarted (its earlier stores below ESP
/// stay, as on hardware).
fn restartable(c: &mut Cpu, f: impl FnOnce(&mut Cpu) -> R) -> R {
    let esp = c.st.gpr[4];
    let r = f(c);
    if r.is_err() {
        c.st.gpr[4] = esp;
    }
    r
}

pub(crate) fn pusha(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    restartable(c, |c| pusha_body(c, d, bus))
}

fn pusha_body(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    let ss = c.stack_size();
    let sp0 = c.gr(4, ss);
    let low = sp0.wrapping_sub(8 * size as u64) & size_mask(ss);
    c.seg_lin(seg::SS, low as u32, 8 * size, true)?;
    for r in 0..8 {
        let v = if r == 4 { sp0 } else { c.gr(r, size) };
        c.push(bus, size, v & size_mask(size))?;
    }
    Ok(())
}

pub(crate) fn popa(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    let mut vals = [0u64; 8];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = c.peek_stack(bus, (i * size as usize) as u32, size)?;
    }
    for (i, v) in vals.iter().enumerate() {
        let r = 7 - i;
        if r != 4 {
            c.sr(r, size, *v);
        }
    }
    let ss = c.stack_size();
    let sp = c.gr(4, ss) + 8 * size as u64;
    c.sr(4, ss, sp);
    Ok(())
}

pub(crate) fn pushf(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    if c.v86() && c.iopl() < 3 {
        return Err(Exc::gp(0));
    }
    // VM and RF are cleared in the image.
    let f = (c.eflags() & !(VM | RF)) as u64 & size_mask(size);
    c.push(bus, size, f)?;
    c.note_sensitive(bus, SensitiveKind::Pushf, 0, f);
    Ok(())
}

pub(crate) fn popf(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    if c.v86() && c.iopl() < 3 {
        return Err(Exc::gp(0));
    }
    let v = c.pop(bus, size)?;
    c.sync_flags();
    let cpl = c.cpl;
    let iopl = c.iopl();
    let mut mask = (ARITH | TF | DF | NT | AC | ID) as u64;
    if !c.protected() || cpl == 0 {
        mask |= (IF | IOPL) as u64;
    } else if cpl <= iopl {
        mask |= IF as u64;
    }
    if c.v86() {
        mask &= !(IOPL as u64);
        mask |= IF as u64;
    }
    if size == 2 {
        mask &= 0xffff;
    }
    c.st.rflags = (c.st.rflags & !mask) | (v & mask) | FIXED1 as u64;
    c.lazy.op = FlagOp::Eager;
    c.after_flags_change();
    c.note_sensitive(bus, SensitiveKind::Popf, v, c.st.rflags);
    Ok(())
}

pub(crate) fn enter(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    restartable(c, |c| enter_body(c, d, bus))
}

fn enter_body(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    let alloc = d.insn.immediate16() as u64;
    let level = (d.insn.immediate8_2nd() & 0x1f) as u32;
    let ss = c.stack_size();
    let m = size_mask(ss);
    let bp = c.gr(5, ss);
    c.push(bus, size, c.gr(5, size))?;
    let frame = c.gr(4, ss);
    if level > 0 {
        let mut bpx = bp;
        for _ in 1..level {
            bpx = bpx.wrapping_sub(size as u64) & m;
            let v = c.read_mem(bus, seg::SS, bpx as u32, size)?;
            c.push(bus, size, v)?;
        }
        c.push(bus, size, frame)?;
    }
    let nsp = c.gr(4, ss).wrapping_sub(alloc) & m;
    // The final stack pointer must be writable (SDM: ENTER checks it);
    // Intel processors also check its page for writing.
    let lin = c.seg_lin(seg::SS, nsp as u32, 1, true)?;
    let user = c.cpl == 3;
    c.translate(bus, lin, crate::mmu::AccessKind::Write, user)?;
    c.sr(5, size, frame);
    c.sr(4, ss, nsp);
    Ok(())
}

pub(crate) fn leave(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = stack_op_size(d);
    let ss = c.stack_size();
    let bp = c.gr(5, ss);
    let v = c.read_mem(bus, seg::SS, bp as u32, size)?;
    c.sr(4, ss, bp.wrapping_add(size as u64));
    c.sr(5, size, v);
    Ok(())
}
