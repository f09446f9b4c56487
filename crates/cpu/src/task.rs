//! Hardware task switching through 32-bit and 16-bit (286) TSSs (SDM 7.3,
//! 7.6): JMP/CALL to a TSS or task gate, interrupts through task gates, and
//! IRET with NT set.

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{Exc, Res, Vector};
use crate::flags::FlagOp;
use crate::seg::{selector_index, Descriptor};
use crate::state::{attr, cr, flags::*, seg, Segment};

/// What caused a task switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TaskSource {
    Jmp,
    Call,
    Int,
    Iret,
}

impl Cpu {
    fn set_tss_busy(&mut self, bus: &mut dyn Bus, sel: u16, busy: bool) -> Res {
        let lin = (self.st.gdtr.base as u32).wrapping_add(selector_index(sel) + 4);
        let hi = self.read_lin_sys(bus, lin, 4)? as u32;
        let hi = if busy { hi | (2 << 8) } else { hi & !(2 << 8) };
        self.write_lin_sys(bus, lin, 4, hi as u64)
    }

    /// Switches to the task whose TSS descriptor is `d` (selector `sel`).
    /// The return EIP saved in the old TSS is `self.next_ip`.
    pub(crate) fn task_switch(
        &mut self,
        bus: &mut dyn Bus,
        sel: u16,
        d: Descriptor,
        src: TaskSource,
    ) -> Res {
        let e = (sel & 0xfffc) as u32;
        if sel & 4 != 0 {
            return Err(Exc::fault_code(Vector::TS, e));
        }
        let ty = d.typ();
        let want_busy = src == TaskSource::Iret;
        if d.is_code_data() || !matches!(ty, 0x1 | 0x3 | 0x9 | 0xb) || ((ty & 2 != 0) != want_busy)
        {
            return Err(if src == TaskSource::Iret {
                Exc::fault_code(Vector::TS, e)
            } else {
                Exc::gp(e)
            });
        }
        if !d.present() {
            return Err(Exc::fault_code(Vector::NP, e));
        }
        let new = d.to_segment(sel);
        let new32 = ty & 8 != 0;
        if new.limit < if new32 { 0x67 } else { 0x2b } {
            return Err(Exc::fault_code(Vector::TS, e));
        }
        // The outgoing task's TSS layout follows its own type.
        let old = if self.st.tr.typ() & 8 != 0 {
            &TSS32
        } else {
            &TSS16
        };
        let lay = if new32 { &TSS32 } else { &TSS16 };
        self.sync_flags();
        let old_base = self.st.tr.base as u32;
        let old_sel = self.st.tr.selector;
        // Save the outgoing task.
        let mut fl = self.st.rflags as u32;
        if src == TaskSource::Iret {
            fl &= !NT;
        }
        let w = |c: &mut Cpu, bus: &mut dyn Bus, off: u32, v: u64, sz: u8| {
            c.write_lin_sys(bus, old_base.wrapping_add(off), sz, v)
        };
        let ip = self.next_ip;
        w(self, bus, old.ip, ip, old.w)?;
        w(self, bus, old.flags, fl as u64, old.w)?;
        for i in 0..8 {
            let v = self.st.gpr[i] & 0xffff_ffff;
            w(self, bus, old.gpr + old.w as u32 * i as u32, v, old.w)?;
        }
        for s in 0..old.nseg {
            let v = self.st.seg[s].selector as u64;
            w(self, bus, old.seg + old.sstride * s as u32, v, 2)?;
        }
        if matches!(src, TaskSource::Jmp | TaskSource::Iret) {
            self.set_tss_busy(bus, old_sel, false)?;
        }
        // Read the incoming task.
        let nb = new.base as u32;
        let r = |c: &mut Cpu, bus: &mut dyn Bus, off: u32, sz: u8| {
            c.read_lin_sys(bus, nb.wrapping_add(off), sz)
        };
        let ncr3 = if new32 {
            r(self, bus, 0x1c, 4)?
        } else {
            self.st.cr3
        };
        let neip = r(self, bus, lay.ip, lay.w)?;
        let mut nfl = r(self, bus, lay.flags, lay.w)? as u32;
        let mut ngpr = [0u64; 8];
        for (i, g) in ngpr.iter_mut().enumerate() {
            *g = r(self, bus, lay.gpr + lay.w as u32 * i as u32, lay.w)?;
        }
        // A 16-bit TSS has no FS/GS: they are loaded null.
        let mut nseg = [0u16; 6];
        for (s, v) in nseg.iter_mut().enumerate().take(lay.nseg) {
            *v = r(self, bus, lay.seg + lay.sstride * s as u32, 2)? as u16;
        }
        let nldt = r(self, bus, lay.ldt, 2)? as u16;
        if !new32 {
            // A 286 task has no VM flag and 16-bit registers: the upper
            // halves of the 32-bit registers are kept (as Bochs does).
            nfl = (nfl & 0xffff) | (self.st.rflags as u32 & 0xffff_0000 & !(VM | RF));
            for (i, g) in ngpr.iter_mut().enumerate() {
                *g |= self.st.gpr[i] & 0xffff_0000;
            }
        }
        if matches!(src, TaskSource::Call | TaskSource::Int) {
            self.write_lin_sys(bus, nb, 2, old_sel as u64)?;
            nfl |= NT;
        }
        if src != TaskSource::Iret {
            self.set_tss_busy(bus, sel, true)?;
        }
        self.st.tr = new;
        self.st.tr.attr |= 2; // busy
        self.st.cr0 |= cr::CR0_TS;
        if self.st.cr0 & cr::CR0_PG != 0 {
            self.st.cr3 = ncr3 & 0xffff_ffff;
            self.tlb.flush_nonglobal();
        }
        self.st.rflags = (nfl | FIXED1) as u64;
        self.lazy.op = FlagOp::Eager;
        for (i, g) in ngpr.iter().enumerate() {
            self.st.gpr[i] = *g;
        }
        let neip = if new32 { neip } else { neip & 0xffff };
        self.st.rip = neip;
        self.next_ip = neip;
        // Load LDTR and segments; errors now are #TS in the new task.
        if nldt & !3 == 0 {
            self.st.ldtr = Segment::default();
        } else {
            let ld = self.read_descriptor(bus, nldt & !4, Vector::TS)?;
            if ld.is_code_data() || ld.typ() != 2 {
                return Err(Exc::fault_code(Vector::TS, (nldt & 0xfffc) as u32));
            }
            self.st.ldtr = ld.to_segment(nldt);
        }
        if nfl & VM != 0 {
            for (s, v) in nseg.iter().enumerate() {
                self.st.seg[s] = Segment {
                    selector: *v,
                    base: (*v as u64) << 4,
                    limit: 0xffff,
                    attr: attr::P | attr::S | attr::RW | attr::ACCESSED | (3 << 5),
                };
            }
            self.refresh_all_segs();
        } else {
            let ncpl = (nseg[seg::CS] & 3) as u8;
            let cs_d = self.read_descriptor(bus, nseg[seg::CS], Vector::TS)?;
            if !cs_d.is_code() || !cs_d.is_code_data() {
                return Err(Exc::fault_code(Vector::TS, (nseg[seg::CS] & 0xfffc) as u32));
            }
            self.st.seg[seg::CS] = cs_d.to_segment(nseg[seg::CS]);
            self.cpl = ncpl;
            let ss_d = self.check_new_ss(bus, nseg[seg::SS], ncpl, Vector::TS, 0)?;
            self.st.seg[seg::SS] = ss_d.to_segment(nseg[seg::SS]);
            self.refresh_all_segs();
            for s in [seg::ES, seg::DS, seg::FS, seg::GS] {
                self.load_seg(bus, s, nseg[s]).map_err(|x| match x {
                    Exc::Fault { vector: 13, code } => Exc::Fault {
                        vector: Vector::TS as u8,
                        code,
                    },
                    o => o,
                })?;
            }
        }
        self.stop_block = true;
        Ok(())
    }
}

/// Where a TSS keeps the state a task switch moves.
struct TssLayout {
    /// Register width (4 or 2).
    w: u8,
    ip: u32,
    flags: u32,
    gpr: u32,
    seg: u32,
    sstride: u32,
    /// Segment registers saved (6, or ES/CS/SS/DS for a 286 TSS).
    nseg: usize,
    ldt: u32,
}

const TSS32: TssLayout = TssLayout {
    w: 4,
    ip: 0x20,
    flags: 0x24,
    gpr: 0x28,
    seg: 0x48,
    sstride: 4,
    nseg: 6,
    ldt: 0x60,
};

const TSS16: TssLayout = TssLayout {
    w: 2,
    ip: 0x0e,
    flags: 0x10,
    gpr: 0x12,
    seg: 0x22,
    sstride: 2,
    nseg: 4,
    ldt: 0x2a,
};
