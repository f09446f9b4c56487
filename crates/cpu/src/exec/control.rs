//! Control transfers: near and far JMP/CALL/RET, conditional branches,
//! LOOP/JCXZ, software interrupts and IRET — including call gates, task
//! gates and returns to outer privilege levels.

use iced_x86::{Code, OpKind};

use crate::bus::Bus;
use crate::cpu::{Cpu, RunExit};
use crate::decode::{DecodedInsn, OpK};
use crate::exception::{Exc, Res, Vector};
use crate::flags::size_mask;
use crate::hooks::SensitiveKind;
use crate::seg::Descriptor;
use crate::state::{attr, flags::*, seg, Segment};
use crate::task::TaskSource;

type R = Res;

/// Jcc, specialized per condition code (`CC` is `iced_x86::ConditionCode`
/// as u8) so the condition is decided at decode time.
pub(crate) fn jcc<const CC: u8>(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    if c.cond(crate::exec::cc_from_u8(CC)) {
        c.jump_near(d.imm, d.osize.max(2))?;
    }
    Ok(())
}

/// Near target of a JMP/CALL: relative or through a register/memory.
fn near_target(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> Res<u64> {
    match d.insn.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            Ok(d.insn.near_branch_target())
        }
        _ => c.rd(bus, d, 0),
    }
}

/// Operand size of a branch: from the Code (rel16/rel32, rm16/rm32).
fn branch_size(d: &DecodedInsn) -> u8 {
    match d.insn.op0_kind() {
        OpKind::NearBranch16 | OpKind::FarBranch16 => 2,
        OpKind::NearBranch32 | OpKind::FarBranch32 => 4,
        OpKind::Memory => match d.insn.memory_size().size() {
            4 if is_far(d) => 2,
            6 => 4,
            n => n as u8,
        },
        _ => d.ops[0].size.max(2),
    }
}

fn is_far(d: &DecodedInsn) -> bool {
    matches!(
        d.insn.code(),
        Code::Jmp_m1616 | Code::Jmp_m1632 | Code::Call_m1616 | Code::Call_m1632
    ) || matches!(d.insn.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
}

/// The selector and offset of a far operand (direct or in memory).
fn far_operand(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, size: u8) -> Res<(u16, u32)> {
    match d.insn.op0_kind() {
        OpKind::FarBranch16 => Ok((d.insn.far_branch_selector(), d.insn.far_branch16() as u32)),
        OpKind::FarBranch32 => Ok((d.insn.far_branch_selector(), d.insn.far_branch32())),
        OpKind::Memory => {
            let ea = c.ea(d);
            let off = c.read_mem(bus, d.mseg as usize, ea, size)? as u32;
            let sel = c.read_mem(bus, d.mseg as usize, ea.wrapping_add(size as u32), 2)? as u16;
            Ok((sel, off))
        }
        _ => Err(Exc::ud()),
    }
}

pub(crate) fn jmp(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = branch_size(d);
    if is_far(d) {
        let (sel, off) = far_operand(c, d, bus, size)?;
        c.note_sensitive(bus, SensitiveKind::FarJmp, sel as u64, off as u64);
        return c.far_transfer(bus, sel, off, size, false);
    }
    let t = near_target(c, d, bus)?;
    c.jump_near(t, size)
}

pub(crate) fn call(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = branch_size(d);
    if is_far(d) {
        let (sel, off) = far_operand(c, d, bus, size)?;
        c.note_sensitive(bus, SensitiveKind::FarCall, sel as u64, off as u64);
        return c.far_transfer(bus, sel, off, size, true);
    }
    let t = near_target(c, d, bus)? & size_mask(size);
    if t > c.st.seg[seg::CS].limit as u64 {
        return Err(Exc::gp(0));
    }
    let ret = c.next_ip;
    c.push(bus, size, ret)?;
    c.next_ip = t;
    Ok(())
}

pub(crate) fn ret(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = c_op_size(d);
    let t = c.peek_stack(bus, 0, size)?;
    if t > c.st.seg[seg::CS].limit as u64 {
        return Err(Exc::gp(0));
    }
    let ss = c.stack_size();
    let imm = if d.ops[0].kind == OpK::Imm {
        d.imm & 0xffff
    } else {
        0
    };
    let sp = c.gr(4, ss).wrapping_add(size as u64).wrapping_add(imm);
    c.sr(4, ss, sp);
    c.next_ip = t;
    Ok(())
}

/// Operand size of RET/RETF/IRET/PUSH-class instructions from their Code.
fn c_op_size(d: &DecodedInsn) -> u8 {
    match crate::facts::operand_size(d.insn.code()) {
        16 => 2,
        32 => 4,
        _ => {
            if d.insn.code_size() == iced_x86::CodeSize::Code16 {
                2
            } else {
                4
            }
        }
    }
}

pub(crate) fn retf(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = c_op_size(d);
    let imm = if d.ops[0].kind == OpK::Imm {
        (d.imm & 0xffff) as u32
    } else {
        0
    };
    let off = c.peek_stack(bus, 0, size)? as u32;
    let sel = c.peek_stack(bus, size as u32, 2)? as u16;
    c.note_sensitive(bus, SensitiveKind::FarRet, sel as u64, off as u64);
    if !c.protected() || c.v86() {
        let ss = c.stack_size();
        c.load_cs_real(sel);
        c.next_ip = off as u64 & size_mask(size);
        let sp = c.gr(4, ss) + 2 * size as u64 + imm as u64;
        c.sr(4, ss, sp);
        return Ok(());
    }
    c.return_protected(bus, sel, off, size, imm, None)
}

pub(crate) fn loop_(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let asz = match d.insn.code() {
        Code::Loop_rel8_16_CX
        | Code::Loope_rel8_16_CX
        | Code::Loopne_rel8_16_CX
        | Code::Loop_rel8_32_CX
        | Code::Loope_rel8_32_CX
        | Code::Loopne_rel8_32_CX => 2,
        _ => 4,
    };
    let cx = c.gr(1, asz).wrapping_sub(1) & size_mask(asz);
    c.sr(1, asz, cx);
    let take = cx != 0
        && match d.insn.mnemonic() {
            iced_x86::Mnemonic::Loope => c.zf(),
            iced_x86::Mnemonic::Loopne => !c.zf(),
            _ => true,
        };
    if take {
        c.jump_near(d.insn.near_branch_target(), d.osize.max(2))?;
    }
    Ok(())
}

pub(crate) fn jcxz(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    let asz = if d.insn.code() == Code::Jcxz_rel8_16 || d.insn.code() == Code::Jcxz_rel8_32 {
        2
    } else {
        4
    };
    if c.gr(1, asz) == 0 {
        c.jump_near(d.insn.near_branch_target(), d.osize.max(2))?;
    }
    Ok(())
}

pub(crate) fn int(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    c.soft_int(bus, (d.imm & 0xff) as u8, true)
}

/// INT3, INTO and ICEBP raise exceptions (#BP, #OF, #DB), so the exception
/// bitmap intercepts them, as VMX does; INT n never is. RIP is already past
/// the instruction (`software: true`).
fn soft_exception_intercepted(c: &Cpu, vector: u8) -> R {
    if c.exception_bitmap & (1 << vector) != 0 {
        return Err(Exc::Exit(RunExit::Exception {
            vector,
            error_code: None,
            software: true,
        }));
    }
    Ok(())
}

pub(crate) fn int3(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    soft_exception_intercepted(c, Vector::BP as u8)?;
    c.soft_int(bus, Vector::BP as u8, true)
}

pub(crate) fn int1(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    soft_exception_intercepted(c, Vector::DB as u8)?;
    // ICEBP delivers #DB like a hardware exception: no gate DPL check.
    c.soft_int(bus, Vector::DB as u8, false)
}

pub(crate) fn into(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if c.of() {
        soft_exception_intercepted(c, Vector::OF as u8)?;
        c.soft_int(bus, Vector::OF as u8, true)
    } else {
        Ok(())
    }
}

pub(crate) fn iret(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    // IRET ends NMI blocking (even one that faults later: SDM 6.7.1).
    c.st.nmi_blocked = false;
    let size = c_op_size(d);
    c.sync_flags();
    let old = c.st.rflags;
    // The report describes the IRET as it began (CS and CPL change).
    let before = (c.st.seg[seg::CS].base, c.cpl, c.iopl());
    if !c.protected() {
        let ip = c.peek_stack(bus, 0, size)? as u32;
        let cs = c.peek_stack(bus, size as u32, 2)? as u16;
        let fl = c.peek_stack(bus, 2 * size as u32, size)?;
        let ss = c.stack_size();
        let sp = c.gr(4, ss) + 3 * size as u64;
        c.sr(4, ss, sp);
        c.load_cs_real(cs);
        c.next_ip = ip as u64 & size_mask(size);
        let mask: u64 = if size == 4 {
            (ARITH | TF | IF | DF | IOPL | NT | AC | ID) as u64
        } else {
            0x7fd5 | (TF | IF | DF) as u64
        };
        c.st.rflags = (c.st.rflags & !mask) | (fl & mask) | FIXED1 as u64;
        c.after_flags_change();
        c.note_sensitive_as(bus, SensitiveKind::Iret, fl, c.st.rflags, before);
        return Ok(());
    }
    if c.v86() {
        if c.iopl() != 3 {
            return Err(Exc::gp(0));
        }
        let ip = c.peek_stack(bus, 0, size)? as u32;
        let cs = c.peek_stack(bus, size as u32, 2)? as u16;
        let fl = c.peek_stack(bus, 2 * size as u32, size)?;
        let ss = c.stack_size();
        let sp = c.gr(4, ss) + 3 * size as u64;
        c.sr(4, ss, sp);
        c.load_seg(bus, seg::CS, cs).ok();
        c.st.seg[seg::CS].selector = cs;
        c.st.seg[seg::CS].base = (cs as u64) << 4;
        c.next_ip = ip as u64 & size_mask(size);
        let mask: u64 = if size == 4 {
            (ARITH | TF | IF | DF | NT | AC | ID) as u64
        } else {
            0x4fd5 | (TF | IF | DF) as u64
        };
        c.st.rflags = (c.st.rflags & !mask) | (fl & mask) | FIXED1 as u64;
        c.after_flags_change();
        return Ok(());
    }
    if c.st.rflags & NT as u64 != 0 {
        // Return from a nested task through the back link.
        let link = c.read_lin_sys(bus, c.st.tr.base as u32, 2)? as u16;
        let desc = c.read_descriptor(bus, link, Vector::TS)?;
        c.note_sensitive(bus, SensitiveKind::Iret, old, old);
        return c.task_switch(bus, link, desc, TaskSource::Iret);
    }
    let off = c.peek_stack(bus, 0, size)? as u32;
    let sel = c.peek_stack(bus, size as u32, 2)? as u16;
    let fl = c.peek_stack(bus, 2 * size as u32, size)?;
    if size == 4 && fl & VM as u64 != 0 && c.cpl == 0 {
        return c.iret_to_v86(bus, off, sel, fl);
    }
    c.return_protected(bus, sel, off, size, 0, Some(fl))?;
    c.note_sensitive_as(bus, SensitiveKind::Iret, fl, c.st.rflags, before);
    Ok(())
}

impl Cpu {
    /// Loads CS in real or virtual-8086 mode.
    pub(crate) fn load_cs_real(&mut self, sel: u16) {
        let v86 = self.v86();
        let cs = &mut self.st.seg[seg::CS];
        cs.selector = sel;
        cs.base = (sel as u64) << 4;
        if v86 {
            cs.limit = 0xffff;
            cs.attr = attr::P | attr::S | attr::CODE | attr::RW | attr::ACCESSED | (3 << 5);
        }
        self.refresh_seg(seg::CS);
        self.stop_block = true;
    }

    /// Loads CS with a code descriptor at privilege `cpl`.
    pub(crate) fn load_cs_desc(
        &mut self,
        bus: &mut dyn Bus,
        sel: u16,
        d: Descriptor,
        cpl: u8,
    ) -> Res {
        self.set_accessed(bus, sel, d)?;
        let mut s = d.to_segment((sel & !3) | cpl as u16);
        s.attr |= attr::ACCESSED;
        self.st.seg[seg::CS] = s;
        self.refresh_seg(seg::CS);
        self.cpl = cpl;
        self.stop_block = true;
        Ok(())
    }

    /// Checks a code-segment target for a same-privilege far transfer.
    fn check_code_target(&mut self, bus: &mut dyn Bus, sel: u16) -> Res<Descriptor> {
        if sel & !3 == 0 {
            return Err(Exc::gp(0));
        }
        let d = self.read_descriptor(bus, sel, Vector::GP)?;
        Ok(d)
    }

    /// Far JMP or CALL to `sel:off` (SDM JMP/CALL pseudo-code).
    pub(crate) fn far_transfer(
        &mut self,
        bus: &mut dyn Bus,
        sel: u16,
        off: u32,
        size: u8,
        call: bool,
    ) -> R {
        let off = off & size_mask(size) as u32;
        if !self.protected() || self.v86() {
            if call {
                let cs = self.st.seg[seg::CS].selector as u64;
                let ret = self.next_ip;
                self.push(bus, size, cs)?;
                self.push(bus, size, ret)?;
            }
            self.load_cs_real(sel);
            self.next_ip = off as u64;
            return Ok(());
        }
        let cpl = self.cpl;
        let e = (sel & 0xfffc) as u32;
        let d = self.check_code_target(bus, sel)?;
        if d.is_code_data() {
            if !d.is_code() {
                return Err(Exc::gp(e));
            }
            let rpl = (sel & 3) as u8;
            if d.conforming() {
                if d.dpl() > cpl {
                    return Err(Exc::gp(e));
                }
            } else if rpl > cpl || d.dpl() != cpl {
                return Err(Exc::gp(e));
            }
            if !d.present() {
                return Err(Exc::fault_code(Vector::NP, e));
            }
            if off > d.to_segment(sel).limit {
                return Err(Exc::gp(0));
            }
            if call {
                self.push_far_return(bus, size)?;
            }
            self.load_cs_desc(bus, sel, d, cpl)?;
            self.next_ip = off as u64;
            return Ok(());
        }
        match d.typ() {
            0x4 | 0xc => self.through_call_gate(bus, sel, d, call),
            0x5 => {
                if d.dpl() < cpl || d.dpl() < (sel & 3) as u8 {
                    return Err(Exc::gp(e));
                }
                if !d.present() {
                    return Err(Exc::fault_code(Vector::NP, e));
                }
                let tss = (d.lo >> 16) as u16;
                let td = self.read_descriptor(bus, tss, Vector::GP)?;
                self.task_switch(
                    bus,
                    tss,
                    td,
                    if call {
                        TaskSource::Call
                    } else {
                        TaskSource::Jmp
                    },
                )
            }
            0x1 | 0x9 => {
                if d.dpl() < cpl || d.dpl() < (sel & 3) as u8 {
                    return Err(Exc::gp(e));
                }
                if !d.present() {
                    return Err(Exc::fault_code(Vector::NP, e));
                }
                self.task_switch(
                    bus,
                    sel,
                    d,
                    if call {
                        TaskSource::Call
                    } else {
                        TaskSource::Jmp
                    },
                )
            }
            _ => Err(Exc::gp(e)),
        }
    }

    fn push_far_return(&mut self, bus: &mut dyn Bus, size: u8) -> R {
        // Check both slots before writing either, so a fault leaves ESP.
        let ss = self.stack_size();
        let sp = self.gr(4, ss) as u32;
        let m = size_mask(ss) as u32;
        self.seg_lin(
            seg::SS,
            sp.wrapping_sub(2 * size as u32) & m,
            2 * size,
            true,
        )?;
        let cs = self.st.seg[seg::CS].selector as u64;
        let ret = self.next_ip;
        self.push(bus, size, cs)?;
        self.push(bus, size, ret)
    }

    fn through_call_gate(&mut self, bus: &mut dyn Bus, sel: u16, g: Descriptor, call: bool) -> R {
        let cpl = self.cpl;
        let e = (sel & 0xfffc) as u32;
        if g.dpl() < cpl || g.dpl() < (sel & 3) as u8 {
            return Err(Exc::gp(e));
        }
        if !g.present() {
            return Err(Exc::fault_code(Vector::NP, e));
        }
        let gate32 = g.typ() == 0xc;
        let tsel = (g.lo >> 16) as u16;
        let toff = if gate32 {
            (g.lo & 0xffff) | (g.hi & 0xffff_0000)
        } else {
            g.lo & 0xffff
        };
        if tsel & !3 == 0 {
            return Err(Exc::gp(0));
        }
        let te = (tsel & 0xfffc) as u32;
        let d = self.read_descriptor(bus, tsel, Vector::GP)?;
        if !d.is_code_data() || !d.is_code() || d.dpl() > cpl {
            return Err(Exc::gp(te));
        }
        if !d.present() {
            return Err(Exc::fault_code(Vector::NP, te));
        }
        let size = if gate32 { 4 } else { 2 };
        if toff > d.to_segment(tsel).limit {
            return Err(Exc::gp(0));
        }
        if !call {
            if !d.conforming() && d.dpl() != cpl {
                return Err(Exc::gp(te));
            }
            self.load_cs_desc(bus, tsel, d, cpl)?;
            self.next_ip = toff as u64;
            return Ok(());
        }
        if !d.conforming() && d.dpl() < cpl {
            // Inner privilege: switch to the TSS stack and copy parameters.
            let ncpl = d.dpl();
            let (nss_sel, nsp) = self.tss_stack(bus, ncpl, false)?;
            let nss = self.check_new_ss(bus, nss_sel, ncpl, Vector::TS, 0)?;
            let count = g.hi & 0x1f;
            let old_ss = self.st.seg[seg::SS].selector as u64;
            let old_sp = self.gr(4, self.stack_size());
            let mut params = Vec::with_capacity(count as usize);
            for i in 0..count {
                params.push(self.peek_stack(bus, i * size as u32, size)?);
            }
            let mut sp = nsp;
            let nss_seg = nss.to_segment(nss_sel);
            let mut pushv = |c: &mut Cpu, v: u64| -> R {
                sp = sp.wrapping_sub(size as u32) & if nss_seg.big() { u32::MAX } else { 0xffff };
                let lin = Cpu::seg_value_lin(&nss_seg, sp, size)
                    .ok_or(Exc::fault_code(Vector::SS, (nss_sel & 0xfffc) as u32))?;
                c.write_lin_slow_priv(bus, lin, size, v, ncpl == 3)
            };
            pushv(self, old_ss)?;
            pushv(self, old_sp)?;
            for p in params.iter().rev() {
                pushv(self, *p)?;
            }
            pushv(self, self.st.seg[seg::CS].selector as u64)?;
            let ret = self.next_ip;
            pushv(self, ret)?;
            self.set_accessed(bus, nss_sel, nss)?;
            self.st.seg[seg::SS] = nss_seg;
            self.st.seg[seg::SS].attr |= attr::ACCESSED;
            let ssz = if nss_seg.big() { 4 } else { 2 };
            self.sr(4, ssz, sp as u64);
            self.load_cs_desc(bus, tsel, d, ncpl)?;
            self.refresh_seg(seg::SS);
            self.next_ip = toff as u64;
            return Ok(());
        }
        self.push_far_return(bus, size)?;
        self.load_cs_desc(bus, tsel, d, cpl)?;
        self.next_ip = toff as u64;
        Ok(())
    }

    /// Validates a stack segment being switched to at privilege `cpl`.
    pub(crate) fn check_new_ss(
        &mut self,
        bus: &mut dyn Bus,
        sel: u16,
        cpl: u8,
        err: Vector,
        ext: u32,
    ) -> Res<Descriptor> {
        if sel & !3 == 0 {
            return Err(Exc::fault_code(err, ext));
        }
        let e = (sel & 0xfffc) as u32 + ext;
        let d = self.read_descriptor(bus, sel, err).map_err(|x| match x {
            Exc::Fault { vector, .. } if vector == err as u8 => Exc::fault_code(err, e),
            other => other,
        })?;
        if (sel & 3) as u8 != cpl || d.dpl() != cpl || !d.is_code_data() || !d.writable_data() {
            return Err(Exc::fault_code(err, e));
        }
        if !d.present() {
            return Err(Exc::fault_code(Vector::SS, e));
        }
        Ok(d)
    }

    /// The stack for privilege level `cpl` from the current TSS.
    pub(crate) fn tss_stack(&mut self, bus: &mut dyn Bus, cpl: u8, ext: bool) -> Res<(u16, u32)> {
        let tr = self.st.tr;
        let e = (tr.selector & 0xfffc) as u32 + ext as u32;
        let is32 = tr.typ() & 8 != 0;
        let (sp_off, ss_off, spsz) = if is32 {
            (4 + 8 * cpl as u32, 8 + 8 * cpl as u32, 4)
        } else {
            (2 + 4 * cpl as u32, 4 + 4 * cpl as u32, 2)
        };
        if ss_off + 1 > tr.limit {
            return Err(Exc::fault_code(Vector::TS, e));
        }
        let base = tr.base as u32;
        let sp = self.read_lin_sys(bus, base.wrapping_add(sp_off), spsz)? as u32;
        let ss = self.read_lin_sys(bus, base.wrapping_add(ss_off), 2)? as u16;
        Ok((ss, sp))
    }

    /// Writes at a linear address with an explicit privilege.
    pub(crate) fn write_lin_slow_priv(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        size: u8,
        v: u64,
        user: bool,
    ) -> R {
        if user {
            let saved = self.cpl;
            self.cpl = 3;
            let r = self.write_lin(bus, lin, size, v);
            self.cpl = saved;
            r
        } else {
            self.write_lin_sys(bus, lin, size, v)
        }
    }

    /// Far RET / IRET in protected mode to `sel:off`, popping `imm` more
    /// bytes of parameters; `flags` is the EFLAGS image for IRET.
    pub(crate) fn return_protected(
        &mut self,
        bus: &mut dyn Bus,
        sel: u16,
        off: u32,
        size: u8,
        imm: u32,
        flags: Option<u64>,
    ) -> R {
        let cpl = self.cpl;
        let rpl = (sel & 3) as u8;
        if sel & !3 == 0 {
            return Err(Exc::gp(0));
        }
        let e = (sel & 0xfffc) as u32;
        let d = self.read_descriptor(bus, sel, Vector::GP)?;
        if rpl < cpl || !d.is_code_data() || !d.is_code() {
            return Err(Exc::gp(e));
        }
        if d.conforming() {
            if d.dpl() > rpl {
                return Err(Exc::gp(e));
            }
        } else if d.dpl() != rpl {
            return Err(Exc::gp(e));
        }
        if !d.present() {
            return Err(Exc::fault_code(Vector::NP, e));
        }
        let frame = if flags.is_some() { 3 } else { 2 } * size as u32;
        let off = off & size_mask(size) as u32;
        if off > d.to_segment(sel).limit {
            return Err(Exc::gp(0));
        }
        let ssz = self.stack_size();
        if rpl == cpl {
            self.load_cs_desc(bus, sel, d, cpl)?;
            let sp = self.gr(4, ssz) + frame as u64 + imm as u64;
            self.sr(4, ssz, sp);
        } else {
            let nsp = self.peek_stack(bus, frame + imm, size)? as u32;
            let nss_sel = self.peek_stack(bus, frame + imm + size as u32, 2)? as u16;
            let nss = self.check_new_ss(bus, nss_sel, rpl, Vector::GP, 0)?;
            self.load_cs_desc(bus, sel, d, rpl)?;
            self.set_accessed(bus, nss_sel, nss)?;
            self.st.seg[seg::SS] = nss.to_segment(nss_sel);
            self.st.seg[seg::SS].attr |= attr::ACCESSED;
            let nssz = if self.st.seg[seg::SS].big() { 4 } else { 2 };
            self.sr(
                4,
                nssz,
                (nsp as u64).wrapping_add(if flags.is_some() { 0 } else { imm as u64 }),
            );
            self.refresh_seg(seg::SS);
            // Data segments the outer level may not use become null.
            for s in [seg::ES, seg::DS, seg::FS, seg::GS] {
                let sg = self.st.seg[s];
                let conforming_code = sg.attr & (attr::CODE | attr::DC) == (attr::CODE | attr::DC);
                if sg.present() && !conforming_code && sg.dpl() < rpl {
                    self.st.seg[s] = Segment {
                        selector: 0,
                        ..Segment::default()
                    };
                    self.refresh_seg(s);
                }
            }
        }
        if let Some(fl) = flags {
            // CPL here is the old CPL: it decides which flags IRET may change.
            let mut mask = (ARITH | TF | DF | NT | RF | AC | ID) as u64;
            if cpl <= self.iopl() {
                mask |= IF as u64;
            }
            if cpl == 0 {
                mask |= (IOPL | VIF | VIP) as u64;
            }
            if size == 2 {
                mask &= 0xffff;
            }
            self.st.rflags = (self.st.rflags & !mask) | (fl & mask) | FIXED1 as u64;
            self.lazy.op = crate::flags::FlagOp::Eager;
            self.after_flags_change();
        }
        self.next_ip = off as u64;
        Ok(())
    }

    fn iret_to_v86(&mut self, bus: &mut dyn Bus, off: u32, sel: u16, fl: u64) -> R {
        let esp = self.peek_stack(bus, 12, 4)? as u32;
        let ss = self.peek_stack(bus, 16, 4)? as u16;
        let es = self.peek_stack(bus, 20, 4)? as u16;
        let ds = self.peek_stack(bus, 24, 4)? as u16;
        let fs = self.peek_stack(bus, 28, 4)? as u16;
        let gs = self.peek_stack(bus, 32, 4)? as u16;
        self.st.rflags = (fl & 0x003f_7fd5) | FIXED1 as u64 | VM as u64;
        self.lazy.op = crate::flags::FlagOp::Eager;
        for (s, v) in [
            (seg::CS, sel),
            (seg::SS, ss),
            (seg::ES, es),
            (seg::DS, ds),
            (seg::FS, fs),
            (seg::GS, gs),
        ] {
            self.st.seg[s] = Segment {
                selector: v,
                base: (v as u64) << 4,
                limit: 0xffff,
                attr: attr::P
                    | attr::S
                    | attr::RW
                    | attr::ACCESSED
                    | (3 << 5)
                    | if s == seg::CS { attr::CODE } else { 0 },
            };
        }
        self.st.gpr[4] = esp as u64;
        self.refresh_all_segs();
        self.next_ip = (off & 0xffff) as u64;
        self.stop_block = true;
        Ok(())
    }

    pub(crate) fn refresh_all_segs(&mut self) {
        for s in 0..6 {
            self.refresh_seg(s);
        }
        self.cpl = self.st.cpl();
    }

    /// INT n, INT3, INTO, ICEBP.
    pub(crate) fn soft_int(&mut self, bus: &mut dyn Bus, vector: u8, check_dpl: bool) -> R {
        self.note_sensitive(bus, SensitiveKind::SoftInt, vector as u64, 0);
        if self.intercept_soft_int {
            return Err(Exc::Exit(RunExit::Exception {
                vector,
                error_code: None,
                software: true,
            }));
        }
        if self.v86() && self.iopl() < 3 && check_dpl {
            return Err(Exc::gp(0));
        }
        let ret = self.next_ip;
        self.sync_flags();
        self.deliver(bus, vector, None, check_dpl, false, ret)?;
        self.stats.deliveries += 1;
        self.next_ip = self.st.rip;
        Ok(())
    }

    /// Things that depend on EFLAGS changed (IF, TF, VM): end the block so
    /// pending interrupts and single-stepping are seen.
    pub(crate) fn after_flags_change(&mut self) {
        self.stop_block = true;
        if self.st.rflags & VM as u64 != 0 {
            self.refresh_all_segs();
        }
    }
}
