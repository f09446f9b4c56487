//! Delivery of exceptions and interrupts: the real-mode IVT and the
//! protected-mode IDT (interrupt, trap and task gates, stack switch through
//! the TSS), with the double-fault rules and triple-fault shutdown.

use crate::bus::Bus;
use crate::cpu::{Cpu, RunExit};
use crate::exception::{Exc, Res, Vector};
use crate::flags::FlagOp;
use crate::state::{attr, flags::*, seg, Segment};
use crate::task::TaskSource;

impl Cpu {
    /// Delivers a fault raised by the instruction at RIP (return address =
    /// the faulting instruction), applying the double-fault rules.
    pub(crate) fn deliver_exception(
        &mut self,
        bus: &mut dyn Bus,
        vector: u8,
        code: Option<u32>,
    ) -> Result<(), RunExit> {
        let ret = self.st.rip;
        self.deliver_chain(bus, vector, code, ret)
    }

    /// Delivers a trap after the instruction completed (RIP already points
    /// at the next instruction).
    pub(crate) fn deliver_trap(&mut self, bus: &mut dyn Bus, vector: u8) -> Result<(), RunExit> {
        let ret = self.st.rip;
        self.deliver_chain(bus, vector, None, ret)
    }

    /// Delivers an external interrupt (INTR), returning to RIP.
    pub(crate) fn deliver_external(
        &mut self,
        bus: &mut dyn Bus,
        vector: u8,
    ) -> Result<(), RunExit> {
        self.sync_flags();
        let ret = self.st.rip;
        match self.deliver(bus, vector, None, false, true, ret) {
            Ok(()) => {
                self.stats.deliveries += 1;
                Ok(())
            }
            Err(Exc::Fault { vector: v, code }) => self.deliver_chain(bus, v, code, ret),
            Err(Exc::Exit(x)) => Err(x),
        }
    }

    fn deliver_chain(
        &mut self,
        bus: &mut dyn Bus,
        mut vector: u8,
        mut code: Option<u32>,
        ret: u64,
    ) -> Result<(), RunExit> {
        self.sync_flags();
        for _ in 0..4 {
            // A double fault is interceptable too (VMX checks the bitmap for
            // the #DF the two exceptions combine into).
            if self.exception_bitmap & (1 << vector) != 0 {
                return Err(RunExit::Exception {
                    vector,
                    error_code: code,
                    software: false,
                });
            }
            let code_pm = if self.protected() && Vector::has_error_code(vector) {
                Some(code.unwrap_or(0))
            } else {
                None
            };
            match self.deliver(bus, vector, code_pm, false, true, ret) {
                Ok(()) => {
                    self.stats.deliveries += 1;
                    return Ok(());
                }
                Err(Exc::Exit(x)) => return Err(x),
                Err(Exc::Fault {
                    vector: v2,
                    code: c2,
                }) => {
                    if vector == Vector::DF as u8 {
                        self.st.halted = true;
                        return Err(RunExit::Shutdown);
                    }
                    let first_contrib = Vector::contributory(vector);
                    let second_contrib = Vector::contributory(v2);
                    let pf = Vector::PF as u8;
                    if (first_contrib && second_contrib)
                        || (vector == pf && (v2 == pf || second_contrib))
                    {
                        vector = Vector::DF as u8;
                        code = Some(0);
                    } else {
                        vector = v2;
                        code = c2;
                    }
                }
            }
        }
        self.st.halted = true;
        Err(RunExit::Shutdown)
    }

    /// Delivers one event through the IVT or IDT. `soft`: INT n (gate DPL
    /// checked, EXT = 0). `ext`: sets the EXT bit in error codes. `ret`:
    /// the return EIP to push.
    pub(crate) fn deliver(
        &mut self,
        bus: &mut dyn Bus,
        vector: u8,
        code: Option<u32>,
        soft: bool,
        ext: bool,
        ret: u64,
    ) -> Res {
        self.st.halted = false;
        if !self.protected() {
            return self.deliver_real(bus, vector, ret);
        }
        let e = (ext && !soft) as u32;
        let idt_err = vector as u32 * 8 + 2 + e;
        if vector as u32 * 8 + 7 > self.st.idtr.limit as u32 {
            return Err(Exc::gp(idt_err));
        }
        let lin = (self.st.idtr.base as u32).wrapping_add(vector as u32 * 8);
        let lo = self.read_lin_sys(bus, lin, 4)? as u32;
        let hi = self.read_lin_sys(bus, lin.wrapping_add(4), 4)? as u32;
        let ty = (hi >> 8) & 0x1f;
        let gate_dpl = ((hi >> 13) & 3) as u8;
        if !matches!(ty, 0x05 | 0x06 | 0x07 | 0x0e | 0x0f) {
            return Err(Exc::gp(idt_err));
        }
        if soft && gate_dpl < self.cpl {
            return Err(Exc::gp(idt_err));
        }
        if hi & (1 << 15) == 0 {
            return Err(Exc::fault_code(Vector::NP, idt_err));
        }
        if ty == 0x05 {
            let tss = (lo >> 16) as u16;
            let td = self.read_descriptor(bus, tss, Vector::TS)?;
            self.next_ip = ret;
            self.task_switch(bus, tss, td, TaskSource::Int)?;
            if let Some(c) = code {
                let size = if self.st.tr.typ() & 8 != 0 { 4 } else { 2 };
                self.push(bus, size, c as u64)?;
            }
            self.st.rip = self.next_ip;
            return Ok(());
        }
        let gate32 = ty & 8 != 0;
        let size: u8 = if gate32 { 4 } else { 2 };
        let tsel = (lo >> 16) as u16;
        let toff = if gate32 {
            (lo & 0xffff) | (hi & 0xffff_0000)
        } else {
            lo & 0xffff
        };
        if tsel & !3 == 0 {
            return Err(Exc::gp(e));
        }
        let te = (tsel & 0xfffc) as u32 + e;
        let d = self.read_descriptor(bus, tsel, Vector::GP).map_err(|x| {
            if matches!(x, Exc::Fault { vector: 13, .. }) {
                Exc::gp(te)
            } else {
                x
            }
        })?;
        if !d.is_code_data() || !d.is_code() || d.dpl() > self.cpl {
            return Err(Exc::gp(te));
        }
        if !d.present() {
            return Err(Exc::fault_code(Vector::NP, te));
        }
        let target = d.to_segment(tsel);
        if toff > target.limit {
            return Err(Exc::gp(e));
        }
        let old_flags = self.eflags() as u64 | (self.st.rflags & !0xffff_ffff);
        let v86 = self.v86();
        let old_cs = self.st.seg[seg::CS].selector as u64;
        if !d.conforming() && d.dpl() < self.cpl {
            let ncpl = d.dpl();
            if v86 && ncpl != 0 {
                // From virtual-8086 mode only a ring-0 handler is allowed.
                return Err(Exc::gp(te));
            }
            let (nss_sel, nsp) = self.tss_stack(bus, ncpl, e != 0)?;
            let nss = self.check_new_ss(bus, nss_sel, ncpl, Vector::TS, e)?;
            let nss_seg = nss.to_segment(nss_sel);
            let old_ss = self.st.seg[seg::SS].selector as u64;
            let old_sp = self.st.gpr[4] & 0xffff_ffff;
            let mut frame: Vec<u64> = Vec::with_capacity(10);
            if v86 {
                for s in [seg::GS, seg::FS, seg::DS, seg::ES] {
                    frame.push(self.st.seg[s].selector as u64);
                }
            }
            frame.extend_from_slice(&[old_ss, old_sp, old_flags, old_cs, ret]);
            if let Some(c) = code {
                frame.push(c as u64);
            }
            let mask = if nss_seg.big() { u32::MAX } else { 0xffff };
            let mut sp = nsp;
            for v in frame {
                sp = sp.wrapping_sub(size as u32) & mask;
                let lin = Cpu::seg_value_lin(&nss_seg, sp, size)
                    .ok_or(Exc::fault_code(Vector::SS, (nss_sel & 0xfffc) as u32 + e))?;
                self.write_lin_sys(bus, lin, size, v)?;
            }
            self.set_accessed(bus, nss_sel, nss)?;
            self.st.seg[seg::SS] = nss_seg;
            self.st.seg[seg::SS].attr |= attr::ACCESSED;
            if nss_seg.big() {
                self.st.gpr[4] = sp as u64;
            } else {
                self.st.gpr[4] = (self.st.gpr[4] & !0xffff) | sp as u64;
            }
            if v86 {
                for s in [seg::ES, seg::DS, seg::FS, seg::GS] {
                    self.st.seg[s] = Segment::default();
                }
            }
            self.load_cs_desc(bus, tsel, d, ncpl)?;
        } else if d.conforming() || d.dpl() == self.cpl {
            if v86 {
                return Err(Exc::gp(te));
            }
            let mut frame = vec![old_flags, old_cs, ret];
            if let Some(c) = code {
                frame.push(c as u64);
            }
            // Check the whole frame first so a fault leaves ESP unchanged.
            let ssz = self.stack_size();
            let sp = self.gr(4, ssz) as u32;
            let total = size as u32 * frame.len() as u32;
            let m = if ssz == 4 { u32::MAX } else { 0xffff };
            self.seg_lin(seg::SS, sp.wrapping_sub(total) & m, total as u8, true)
                .map_err(|_| Exc::fault_code(Vector::SS, e))?;
            for v in frame {
                self.push(bus, size, v)?;
            }
            let cpl = self.cpl;
            self.load_cs_desc(bus, tsel, d, cpl)?;
        } else {
            return Err(Exc::gp(te));
        }
        let mut fl = self.st.rflags & !((TF | NT | RF | VM) as u64);
        if ty & 1 == 0 {
            fl &= !(IF as u64);
        }
        self.st.rflags = fl;
        self.lazy.op = FlagOp::Eager;
        self.refresh_all_segs();
        self.st.rip = toff as u64;
        self.next_ip = toff as u64;
        self.stop_block = true;
        Ok(())
    }

    fn deliver_real(&mut self, bus: &mut dyn Bus, vector: u8, ret: u64) -> Res {
        let off = vector as u32 * 4;
        if off + 3 > self.st.idtr.limit as u32 {
            return Err(Exc::gp(0));
        }
        let lin = (self.st.idtr.base as u32).wrapping_add(off);
        let ip = self.read_lin_sys(bus, lin, 2)?;
        let cs = self.read_lin_sys(bus, lin + 2, 2)? as u16;
        let fl = self.eflags() as u64 & 0xffff;
        let old_cs = self.st.seg[seg::CS].selector as u64;
        self.push(bus, 2, fl)?;
        self.push(bus, 2, old_cs)?;
        self.push(bus, 2, ret & 0xffff)?;
        self.st.rflags &= !((IF | TF | AC | RF) as u64);
        self.lazy.op = FlagOp::Eager;
        self.load_cs_real(cs);
        self.st.rip = ip;
        self.next_ip = ip;
        self.stop_block = true;
        Ok(())
    }
}
