//! The privileged instructions of the guest kernel, emulated on the
//! virtual CPU after they faulted at real ring 1: the interrupt flag, HLT,
//! control and debug registers, LMSW, and the descriptor-table registers.
//! Each either completes with its action in words (the caller counts,
//! traces and skips it) or ends with a flow of its own.

use super::*;

/// An emulation that completed with this action in words, or ended with
/// its own flow (a fault delivered, an exit).
pub(crate) type Emulated = Result<String, Handled>;

impl Trap {
    /// CLI/STI: the virtual IF (STI with its one-instruction shadow).
    pub(crate) fn set_virtual_if(&mut self, on: bool, eip: u64) -> String {
        self.v.vif = on;
        if on {
            self.inhibit = true;
            "virtual IF := 1 (one-instruction shadow)".into()
        } else {
            self.last_cli = Some(eip);
            "virtual IF := 0".into()
        }
    }

    /// HLT: the virtual CPU waits for an interrupt.
    pub(crate) fn emulate_hlt(&mut self, i: &Instruction, eip: u64) -> Handled {
        self.count("#GP hlt");
        self.trace_line("#GP", eip, "HLT: wait for an interrupt");
        self.skip(i);
        self.v.halted = true;
        Ok(Flow::Exit(VmExit::Halt))
    }

    /// MOV to CR0/2/3/4.
    pub(crate) fn mov_to_cr(&mut self, i: &Instruction, eip: u64) -> Handled {
        let cr_n = i.op0_register() as u32 - Register::CR0 as u32;
        let v = self.reg(i.op1_register());
        self.skip(i);
        let action = format!("virtual CR{cr_n} := {v:#x}");
        self.count(format!("#GP mov cr{cr_n}"));
        self.trace_line("#GP", eip, &action);
        self.write_cr(cr_n, v)?;
        Ok(Flow::Continue)
    }

    /// MOV from CR0/2/3/4: the virtual value.
    pub(crate) fn mov_from_cr(&mut self, i: &Instruction, code: u32) -> Emulated {
        let cr_n = i.op1_register() as u32 - Register::CR0 as u32;
        let v = match cr_n {
            0 => self.v.cr0,
            2 => self.v.cr2,
            3 => self.v.cr3,
            4 => self.v.cr4,
            _ => return Err(self.reflect_gp(code, "MOV from a CR that does not exist")),
        };
        self.set_reg(i.op0_register(), v);
        Ok(format!("read virtual CR{cr_n} = {v:#x}"))
    }

    /// MOV to or from a debug register: the virtual ones (breakpoints are
    /// not armed).
    pub(crate) fn mov_dr(&mut self, i: &Instruction) -> String {
        if i.op0_kind() == OpKind::Register && i.op0_register().is_dr() {
            let n = (i.op0_register() as usize - Register::DR0 as usize) & 7;
            self.v.dr[n] = self.reg(i.op1_register());
            format!("virtual DR{n} written (breakpoints not armed)")
        } else {
            let n = (i.op1_register() as usize - Register::DR0 as usize) & 7;
            let v = self.v.dr[n];
            self.set_reg(i.op0_register(), v);
            format!("read virtual DR{n}")
        }
    }

    /// LMSW: the low four bits of CR0 (PE cannot be cleared).
    pub(crate) fn lmsw(&mut self, i: &Instruction, code: u32) -> Handled {
        let v = if i.op0_kind() == OpKind::Memory {
            let mut b = [0u8; 2];
            if let Err(flow) = self.operand(i, &mut b, code, "LMSW") {
                return flow;
            }
            u16::from_le_bytes(b) as u64
        } else {
            self.reg(i.op0_register())
        };
        let new = (self.v.cr0 & !0xe) | (v & 0xf) | (self.v.cr0 & 1);
        self.skip(i);
        self.count("#GP lmsw");
        self.write_cr(0, new)?;
        Ok(Flow::Continue)
    }

    /// Reads `i`'s memory operand into `buf` as the CPU would at ring 0;
    /// `Err` is the flow of the fault delivered (or of the #GP reflected
    /// when there is no memory operand, `what` saying which instruction).
    pub(crate) fn operand(
        &mut self,
        i: &Instruction,
        buf: &mut [u8],
        code: u32,
        what: &str,
    ) -> Result<(), Handled> {
        match self.read_operand(i, buf) {
            None => Err(self.reflect_gp(code, what)),
            Some(Err(ev)) => Err(self.deliver(ev)),
            Some(Ok(())) => Ok(()),
        }
    }

    /// LGDT/LIDT: the virtual GDTR (the shadow GDT rebuilt) or IDTR.
    pub(crate) fn load_table_register(
        &mut self,
        i: &Instruction,
        code: u32,
        gdt: bool,
    ) -> Emulated {
        let mut b = [0u8; 6];
        self.operand(i, &mut b, code, "LGDT/LIDT without memory")?;
        let limit = u16::from_le_bytes([b[0], b[1]]);
        let mut base = u32::from_le_bytes([b[2], b[3], b[4], b[5]]) as u64;
        if popek_cpu::facts::operand_size(i.code()) == 16 {
            base &= 0x00ff_ffff;
        }
        let t = TableReg { base, limit };
        Ok(if gdt {
            self.v.gdtr = t;
            self.sync_gdt();
            format!("virtual GDTR := {base:#x}/{limit:#x}; shadow GDT rebuilt")
        } else {
            self.v.idtr = t;
            format!("virtual IDTR := {base:#x}/{limit:#x}")
        })
    }

    /// The selector operand of LLDT/LTR.
    fn selector_operand(&mut self, i: &Instruction, code: u32) -> Result<u16, Handled> {
        if i.op0_kind() == OpKind::Memory {
            let mut b = [0u8; 2];
            self.operand(i, &mut b, code, "LLDT/LTR")?;
            Ok(u16::from_le_bytes(b))
        } else {
            Ok(self.reg(i.op0_register()) as u16)
        }
    }

    /// LLDT: the virtual LDTR (LDT segments are not shadowed).
    pub(crate) fn load_ldtr(&mut self, i: &Instruction, code: u32) -> Emulated {
        let sel = self.selector_operand(i, code)?;
        if sel & !3 == 0 {
            self.v.ldtr = Segment::default();
        } else {
            match self
                .guest_descriptor(sel)
                .filter(|d| !d.is_code_data() && d.typ() == 2)
            {
                Some(d) => self.v.ldtr = d.to_segment(sel),
                None => return Err(self.reflect_gp((sel & !3) as u32, "LLDT of a non-LDT")),
            }
        }
        Ok(format!(
            "virtual LDTR := {sel:#x} (LDT segments are not shadowed)"
        ))
    }

    /// LTR: the virtual TR, the guest's TSS descriptor marked busy.
    pub(crate) fn load_tr(&mut self, i: &Instruction, code: u32) -> Emulated {
        let sel = self.selector_operand(i, code)?;
        let Some(d) = self
            .guest_descriptor(sel)
            .filter(|d| !d.is_code_data() && matches!(d.typ(), 1 | 9))
        else {
            return Err(self.reflect_gp((sel & !3) as u32, "LTR of a non-TSS"));
        };
        let busy = d.hi | (2 << 8);
        let at = (self.v.gdtr.base as u32).wrapping_add((sel & !7) as u32 + 4);
        let _ = self.guest_write(at, &busy.to_le_bytes());
        self.v.tr = Descriptor { lo: d.lo, hi: busy }.to_segment(sel);
        Ok(format!("virtual TR := {sel:#x} (the guest's TSS)"))
    }
}
