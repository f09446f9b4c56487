//! The virtual CPU and the real one: composing the guest's view of the
//! state (virtual CPL, IF, IOPL, control registers) from the
//! deprivileged CPU, and installing a guest state on it.

use super::*;

impl Trap {
    /// The guest-visible state: the real CPU's registers with the virtual
    /// privileged registers and ring 1 shown as ring 0.
    pub(crate) fn compose(&mut self) -> CpuState {
        let real_cpl = self.cpu.cpl();
        let mut s = self.cpu.state().clone();
        s.cr0 = self.v.cr0;
        s.cr2 = self.v.cr2;
        s.cr3 = self.v.cr3;
        s.cr4 = self.v.cr4;
        s.gdtr = self.v.gdtr;
        s.idtr = self.v.idtr;
        s.ldtr = self.v.ldtr;
        s.tr = self.v.tr;
        s.dr = self.v.dr;
        s.msr = self.v.msr;
        s.rflags = (s.rflags & !((flags::IF | flags::IOPL) as u64))
            | if self.v.vif { flags::IF as u64 } else { 0 }
            | ((self.v.iopl as u64) << 12);
        s.halted = self.v.halted;
        s.interrupt_shadow |= self.inhibit;
        for (i, sg) in s.seg.iter_mut().enumerate() {
            if sg.attr & popek_cpu::state::attr::S != 0 && sg.dpl() == 1 {
                sg.attr &= !(3 << 5);
            }
            if real_cpl == 1 && (i == seg::CS || i == seg::SS) {
                sg.selector &= !3;
            }
            if sg.limit == SEG_TOP && sg.base == 0 {
                sg.limit = u32::MAX;
            }
        }
        s
    }

    /// The real hidden cache for a guest-visible segment, confined below
    /// the monitor's area (`None`: a code segment that cannot be).
    pub(crate) fn real_segment(sg: Segment, i: usize, vcpl: u8) -> Option<Segment> {
        let mut r = sg;
        if r.attr & popek_cpu::state::attr::S != 0 && r.dpl() == 0 {
            r.attr |= 1 << 5;
        }
        if vcpl == 0 && (i == seg::CS || i == seg::SS) {
            r.selector |= 1;
        }
        if r.attr & popek_cpu::state::attr::S == 0 {
            return Some(r);
        }
        desc::confine_segment(r)
    }

    pub(crate) fn install(&mut self, s: CpuState) -> Result<(), EngineError> {
        let unsupported = |reason: &str| EngineError::Unsupported {
            engine: NAME,
            reason: reason.into(),
        };
        if s.cr0 & cr::CR0_PE == 0 {
            return Err(unsupported(
                "the guest is in real mode; trap-and-emulate runs protected-mode guests \
                 (ring deprivileging needs rings): use --engine bt or interp",
            ));
        }
        if s.rflags & flags::VM as u64 != 0 {
            return Err(unsupported("virtual-8086 mode is not virtualized by trap"));
        }
        if s.cr4 & cr::CR4_PAE != 0 || s.efer & (1 << 10) != 0 {
            return Err(unsupported(
                "PAE paging and long mode: trap's shadow page tables are 32-bit (use bt or interp for PAE)",
            ));
        }
        let old = self.started.then(|| self.compose());
        let vcpl = s.cpl();
        if vcpl == 1 || vcpl == 2 {
            return Err(unsupported(
                "guest code at ring 1 or 2: the guest kernel's own ring is taken by ring compression",
            ));
        }
        let paging_changed = old.as_ref().is_none_or(|o| {
            o.cr3 != s.cr3
                || (o.cr0 ^ s.cr0) & (cr::CR0_PG | cr::CR0_WP) != 0
                || (o.cr4 ^ s.cr4) & (cr::CR4_PSE | cr::CR4_PGE) != 0
        });
        let gdt_changed = old.as_ref().is_none_or(|o| o.gdtr != s.gdtr);
        let segs_changed = old.as_ref().is_none_or(|o| o.seg != s.seg);
        self.v.cr0 = s.cr0 | cr::CR0_ET;
        self.v.cr2 = s.cr2;
        if old.as_ref().is_some_and(|o| o.cr3 != s.cr3) {
            self.stats.cr3_switches += 1;
        }
        self.v.cr3 = s.cr3;
        self.v.cr4 = s.cr4;
        self.v.gdtr = s.gdtr;
        self.v.idtr = s.idtr;
        self.v.ldtr = s.ldtr;
        self.v.tr = s.tr;
        self.v.vif = s.rflags & flags::IF as u64 != 0;
        self.v.iopl = ((s.rflags >> 12) & 3) as u8;
        self.v.halted = s.halted;
        self.v.dr = s.dr;
        self.v.msr = s.msr;
        self.inhibit = s.interrupt_shadow;
        let mut r = if segs_changed {
            let mut r = s.clone();
            for i in 0..6 {
                r.seg[i] = Self::real_segment(s.seg[i], i, vcpl).ok_or_else(|| {
                    unsupported(
                        "a code segment reaches the monitor's linear area (the top 4 MiB) \
                         and cannot be cut below it",
                    )
                })?;
            }
            r
        } else {
            let mut r = self.cpu.state().clone();
            r.gpr = s.gpr;
            r.rip = s.rip;
            r.fpu = s.fpu;
            r.rflags = s.rflags;
            r
        };
        let (gdtr, idtr, tr) = desc::real_tables();
        r.cr0 = cr::CR0_PE
            | cr::CR0_PG
            | cr::CR0_WP
            | cr::CR0_ET
            | (s.cr0 & (cr::CR0_MP | cr::CR0_EM | cr::CR0_TS | cr::CR0_NE));
        r.cr3 = self.shadow.root();
        r.cr4 = s.cr4 & (cr::CR4_TSD | cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT);
        r.gdtr = gdtr;
        r.idtr = idtr;
        r.tr = tr;
        r.ldtr = Segment {
            attr: popek_cpu::state::attr::P | 2,
            ..Segment::default()
        };
        r.rflags = (s.rflags | flags::IF as u64 | flags::FIXED1 as u64)
            & !((flags::IOPL | flags::VM | flags::VIF | flags::VIP) as u64);
        r.efer = 0;
        r.dr = [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400];
        r.msr = Msrs::default();
        r.halted = false;
        r.interrupt_shadow = false;
        r.cr2 = self.cpu.state().cr2;
        if segs_changed {
            self.cpu.set_state(r);
        } else {
            // Registers only (a hypercall's result, IF): no TLB flush.
            *self.cpu.state_mut() = r;
        }
        self.started = true;
        self.user_view = vcpl == 3;
        if gdt_changed {
            self.sync_gdt();
        } else {
            let u = self.user_view;
            self.user_view = !u;
            self.set_view(u);
        }
        if paging_changed {
            self.reset_shadow();
        }
        Ok(())
    }

    pub(crate) fn eflags_image(&mut self) -> u32 {
        let f = self.cpu.state().rflags as u32;
        (f & !(flags::IF | flags::IOPL))
            | if self.v.vif { flags::IF } else { 0 }
            | ((self.v.iopl as u32) << 12)
    }
}
