//! The general-protection trap: which instruction the deprivileged guest
//! ran, and its emulation at virtual ring 0 (privileged instructions,
//! control registers, MSRs), or its reflection to the guest.

use super::*;
use crate::io::io_operands;

impl Trap {
    /// Decodes the instruction at CS:EIP, read through the guest's own page
    /// tables (the shadow may not map it yet: an instruction-fetch fault).
    pub(crate) fn fetch(&mut self) -> Option<Instruction> {
        let st = self.cpu.state();
        let lin = st.seg[seg::CS].base.wrapping_add(st.rip) as u32;
        let bits = if st.seg[seg::CS].big() { 32 } else { 16 };
        let rip = st.rip;
        let mut bytes = [0u8; 15];
        let mut n = 0;
        // Byte by byte: the instruction may end where the next page is
        // unmapped.
        for (i, b) in bytes.iter_mut().enumerate() {
            let mut one = [0u8];
            if self
                .guest_read_as(lin.wrapping_add(i as u32), &mut one, false)
                .is_err()
            {
                break;
            }
            *b = one[0];
            n = i + 1;
        }
        if n == 0 {
            return None;
        }
        let mut dec = Decoder::with_ip(bits, &bytes[..n], rip, DecoderOptions::NONE);
        let i = dec.decode();
        (!i.is_invalid()).then_some(i)
    }

    pub(crate) fn reg(&mut self, r: Register) -> u64 {
        let st = self.cpu.state();
        if r.is_segment_register() {
            let i = match r {
                Register::ES => seg::ES,
                Register::CS => seg::CS,
                Register::SS => seg::SS,
                Register::DS => seg::DS,
                Register::FS => seg::FS,
                _ => seg::GS,
            };
            return st.seg[i].base;
        }
        let full = r.full_register32();
        let idx = (full as usize).wrapping_sub(Register::EAX as usize);
        let v = st.gpr.get(idx).copied().unwrap_or(0);
        match r.size() {
            1 if (r as usize) >= Register::AH as usize && (r as usize) <= Register::BH as usize => {
                let idx = r as usize - Register::AH as usize;
                (st.gpr[idx] >> 8) & 0xff
            }
            1 => v & 0xff,
            2 => v & 0xffff,
            _ => v & 0xffff_ffff,
        }
    }

    pub(crate) fn set_reg(&mut self, r: Register, v: u64) {
        let size = r.size();
        if size == 1
            && (r as usize) >= Register::AH as usize
            && (r as usize) <= Register::BH as usize
        {
            let idx = r as usize - Register::AH as usize;
            let old = self.cpu.state().gpr[idx];
            self.cpu.set_gpr(idx, (old & !0xff00) | ((v & 0xff) << 8));
            return;
        }
        let idx = (r.full_register32() as usize).wrapping_sub(Register::EAX as usize);
        let Some(&old) = self.cpu.state().gpr.get(idx) else {
            return;
        };
        let new = match size {
            1 => (old & !0xff) | (v & 0xff),
            2 => (old & !0xffff) | (v & 0xffff),
            _ => v & 0xffff_ffff,
        };
        self.cpu.set_gpr(idx, new);
    }

    /// The linear address of a memory operand.
    pub(crate) fn mem_linear(&mut self, i: &Instruction) -> Option<u32> {
        let regs: Vec<(Register, u64)> = [
            Register::EAX,
            Register::ECX,
            Register::EDX,
            Register::EBX,
            Register::ESP,
            Register::EBP,
            Register::ESI,
            Register::EDI,
            Register::AX,
            Register::CX,
            Register::DX,
            Register::BX,
            Register::SP,
            Register::BP,
            Register::SI,
            Register::DI,
            Register::ES,
            Register::CS,
            Register::SS,
            Register::DS,
            Register::FS,
            Register::GS,
        ]
        .into_iter()
        .map(|r| (r, self.reg(r)))
        .collect();
        let op = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        i.virtual_address(op, 0, |r, _, _| {
            regs.iter().find(|(x, _)| *x == r).map(|(_, v)| *v)
        })
        .map(|a| a as u32)
    }

    /// Reads `i`'s memory operand into `buf` as the CPU does at ring 0:
    /// the guest's view of the segment (usable, readable, within its
    /// limit: else #SS(0) through SS, #GP(0) otherwise), then the guest's
    /// page tables (#PF, with CR2 set). `None`: `i` has no memory operand.
    pub(crate) fn read_operand(
        &mut self,
        i: &Instruction,
        buf: &mut [u8],
    ) -> Option<Result<(), Event>> {
        let op = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        // The offset: segment bases left out (the segment is checked below).
        let offset = i.virtual_address(op, 0, |r, _, _| {
            Some(if r.is_segment_register() {
                0
            } else {
                self.reg(r)
            })
        })? as u32;
        let sreg = match i.memory_segment() {
            Register::ES => seg::ES,
            Register::CS => seg::CS,
            Register::SS => seg::SS,
            Register::FS => seg::FS,
            Register::GS => seg::GS,
            _ => seg::DS,
        };
        let segment = self.compose().seg[sreg];
        use popek_cpu::state::attr::{CODE, RW};
        let readable = segment.attr & CODE == 0 || segment.attr & RW != 0;
        let lin = (segment.present() && readable)
            .then(|| popek_cpu::Cpu::seg_value_lin(&segment, offset, buf.len() as u8))
            .flatten();
        let Some(lin) = lin else {
            let v = if sreg == seg::SS { 12 } else { 13 };
            return Some(Err(Event::Exception(v, Some(0))));
        };
        Some(self.guest_read(lin, buf).map_err(|(l, e)| {
            self.v.cr2 = l as u64;
            Event::Exception(14, Some(e))
        }))
    }

    /// Completes an emulated instruction.
    pub(crate) fn skip(&mut self, i: &Instruction) {
        let mask = if self.cpu.state().seg[seg::CS].big() {
            0xffff_ffff
        } else {
            0xffff
        };
        self.cpu.set_rip(i.next_ip() & mask);
        // The emulated instruction retired, as on the CPU: the guest's
        // clock (TSC, virtual time) counts it.
        self.cpu.icount += 1;
    }

    pub(crate) fn general_protection(&mut self, machine: &mut Machine, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let real_cpl = self.cpu.cpl();
        let Some(i) = self.fetch() else {
            self.count("#GP reflected");
            return self.deliver(Event::Exception(13, Some(code)));
        };
        if code & 2 != 0 {
            // An IDT gate refused the INT n (every shadow gate has DPL 0).
            let vector = (code >> 3) as u8;
            let is_int = matches!(
                i.mnemonic(),
                Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into
            );
            if is_int {
                self.count(format!("#GP int {vector:#x} (reflected)"));
                if self.trace {
                    self.trace_line(
                        "#GP",
                        eip,
                        &format!("INT {vector:#x}: delivered through the guest's IDT"),
                    );
                }
                return self.deliver(Event::Soft(vector, i.next_ip()));
            }
        }
        if code == 0 {
            if let Some(h) = self.monitor_area_access(&i, real_cpl) {
                return h;
            }
        }
        if real_cpl == 3 {
            return self.user_gp(machine, &i, code);
        }
        self.kernel_gp(machine, &i, code)
    }

    pub(crate) fn reflect_gp(&mut self, code: u32, what: &str) -> Handled {
        let eip = self.cpu.state().rip;
        self.count("#GP reflected");
        if self.trace {
            self.trace_line("#GP", eip, &format!("{what}: #GP({code:#x}) reflected"));
        }
        self.deliver(Event::Exception(13, Some(code)))
    }

    pub(crate) fn user_gp(&mut self, machine: &mut Machine, i: &Instruction, code: u32) -> Handled {
        use Mnemonic::*;
        match i.mnemonic() {
            In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd => {
                let (port, size) = io_operands(self, i);
                if self.v.iopl == 3 || self.io_permitted(port, size) {
                    return self.port_io(machine, i, 3);
                }
                self.reflect_gp(code, "ring-3 port I/O the guest's TSS denies")
            }
            Cli | Sti if self.v.iopl == 3 => {
                self.v.vif = i.mnemonic() == Sti;
                self.count("#GP cli/sti at ring 3 (IOPL 3)");
                self.skip(i);
                Ok(Flow::Continue)
            }
            _ => self.reflect_gp(code, "ring 3"),
        }
    }

    pub(crate) fn kernel_gp(
        &mut self,
        machine: &mut Machine,
        i: &Instruction,
        code: u32,
    ) -> Handled {
        use Mnemonic::*;
        let eip = self.cpu.state().rip;
        let m = i.mnemonic();
        let action: String;
        match m {
            Cli => {
                self.v.vif = false;
                self.last_cli = Some(eip);
                action = "virtual IF := 0".into();
            }
            Sti => {
                self.v.vif = true;
                self.inhibit = true;
                action = "virtual IF := 1 (one-instruction shadow)".into();
            }
            Hlt => {
                self.count("#GP hlt");
                self.trace_line("#GP", eip, "HLT: wait for an interrupt");
                self.skip(i);
                self.v.halted = true;
                return Ok(Flow::Exit(VmExit::Halt));
            }
            In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd => {
                return self.port_io(machine, i, 0);
            }
            Mov if i.op0_kind() == OpKind::Register && i.op0_register().is_cr() => {
                let cr_n = i.op0_register() as u32 - Register::CR0 as u32;
                let v = self.reg(i.op1_register());
                self.skip(i);
                action = format!("virtual CR{cr_n} := {v:#x}");
                self.count(format!("#GP mov cr{cr_n}"));
                self.trace_line("#GP", eip, &action);
                self.write_cr(cr_n, v)?;
                return Ok(Flow::Continue);
            }
            Mov if i.op1_kind() == OpKind::Register && i.op1_register().is_cr() => {
                let cr_n = i.op1_register() as u32 - Register::CR0 as u32;
                let v = match cr_n {
                    0 => self.v.cr0,
                    2 => self.v.cr2,
                    3 => self.v.cr3,
                    4 => self.v.cr4,
                    _ => return self.reflect_gp(code, "MOV from a CR that does not exist"),
                };
                self.set_reg(i.op0_register(), v);
                action = format!("read virtual CR{cr_n} = {v:#x}");
            }
            Mov if i.op0_kind() == OpKind::Register && i.op0_register().is_dr() => {
                let n = (i.op0_register() as usize - Register::DR0 as usize) & 7;
                self.v.dr[n] = self.reg(i.op1_register());
                action = format!("virtual DR{n} written (breakpoints not armed)");
            }
            Mov if i.op1_kind() == OpKind::Register && i.op1_register().is_dr() => {
                let n = (i.op1_register() as usize - Register::DR0 as usize) & 7;
                let v = self.v.dr[n];
                self.set_reg(i.op0_register(), v);
                action = format!("read virtual DR{n}");
            }
            Mov | Pop if i.op0_kind() == OpKind::Register && i.op0_register() == Register::SS => {
                return self.load_ss(i, code);
            }
            Clts => {
                self.v.cr0 &= !cr::CR0_TS;
                self.cpu.state_mut().cr0 &= !cr::CR0_TS;
                action = "virtual CR0.TS := 0".into();
            }
            Lmsw => {
                let v = if i.op0_kind() == OpKind::Memory {
                    let mut b = [0u8; 2];
                    match self.read_operand(i, &mut b) {
                        None => return self.reflect_gp(code, "LMSW"),
                        Some(Err(ev)) => return self.deliver(ev),
                        Some(Ok(())) => {}
                    }
                    u16::from_le_bytes(b) as u64
                } else {
                    self.reg(i.op0_register())
                };
                let new = (self.v.cr0 & !0xe) | (v & 0xf) | (self.v.cr0 & 1);
                self.skip(i);
                self.count("#GP lmsw");
                self.write_cr(0, new)?;
                return Ok(Flow::Continue);
            }
            Lgdt | Lidt => {
                let mut b = [0u8; 6];
                match self.read_operand(i, &mut b) {
                    None => return self.reflect_gp(code, "LGDT/LIDT without memory"),
                    Some(Err(ev)) => return self.deliver(ev),
                    Some(Ok(())) => {}
                }
                let limit = u16::from_le_bytes([b[0], b[1]]);
                let mut base = u32::from_le_bytes([b[2], b[3], b[4], b[5]]) as u64;
                if i.op_code().operand_size() == 16 {
                    base &= 0x00ff_ffff;
                }
                let t = TableReg { base, limit };
                if m == Lgdt {
                    self.v.gdtr = t;
                    self.sync_gdt();
                    action = format!("virtual GDTR := {base:#x}/{limit:#x}; shadow GDT rebuilt");
                } else {
                    self.v.idtr = t;
                    action = format!("virtual IDTR := {base:#x}/{limit:#x}");
                }
            }
            Lldt | Ltr => {
                let sel = if i.op0_kind() == OpKind::Memory {
                    let mut b = [0u8; 2];
                    match self.read_operand(i, &mut b) {
                        None => return self.reflect_gp(code, "LLDT/LTR"),
                        Some(Err(ev)) => return self.deliver(ev),
                        Some(Ok(())) => {}
                    }
                    u16::from_le_bytes(b)
                } else {
                    self.reg(i.op0_register()) as u16
                };
                if m == Lldt {
                    if sel & !3 == 0 {
                        self.v.ldtr = Segment::default();
                    } else {
                        match self
                            .guest_descriptor(sel)
                            .filter(|d| !d.is_code_data() && d.typ() == 2)
                        {
                            Some(d) => self.v.ldtr = d.to_segment(sel),
                            None => return self.reflect_gp((sel & !3) as u32, "LLDT of a non-LDT"),
                        }
                    }
                    action = format!("virtual LDTR := {sel:#x} (LDT segments are not shadowed)");
                } else {
                    let Some(d) = self
                        .guest_descriptor(sel)
                        .filter(|d| !d.is_code_data() && matches!(d.typ(), 1 | 9))
                    else {
                        return self.reflect_gp((sel & !3) as u32, "LTR of a non-TSS");
                    };
                    let busy = d.hi | (2 << 8);
                    let at = (self.v.gdtr.base as u32).wrapping_add((sel & !7) as u32 + 4);
                    let _ = self.guest_write(at, &busy.to_le_bytes());
                    self.v.tr = Descriptor { lo: d.lo, hi: busy }.to_segment(sel);
                    action = format!("virtual TR := {sel:#x} (the guest's TSS)");
                }
            }
            Invlpg => {
                let Some(a) = self.mem_linear(i) else {
                    return self.reflect_gp(code, "INVLPG");
                };
                self.invlpg(a);
                action = format!("shadow PTE of {a:#x} dropped");
            }
            Wbinvd | Invd => action = "nothing to do".into(),
            Rdmsr | Wrmsr => return self.msr(machine, i, code),
            Iret | Iretd | Retf => return self.same_ring_return(i, code),
            _ => return self.reflect_gp(code, "not a privileged instruction the monitor emulates"),
        }
        self.count(format!("#GP {}", format!("{m:?}").to_lowercase()));
        if self.trace {
            self.trace_line("#GP", eip, &action);
        }
        self.skip(i);
        Ok(Flow::Continue)
    }

    pub(crate) fn write_cr(&mut self, n: u32, v: u64) -> Result<(), EngineError> {
        let unsupported = |r: &str| EngineError::Unsupported {
            engine: NAME,
            reason: r.into(),
        };
        match n {
            0 => {
                if v & cr::CR0_PE == 0 {
                    return Err(unsupported(
                        "the guest left protected mode (CR0.PE := 0): trap runs protected-mode guests only",
                    ));
                }
                let old = self.v.cr0;
                self.v.cr0 = v | cr::CR0_ET;
                let keep = cr::CR0_MP | cr::CR0_EM | cr::CR0_TS | cr::CR0_NE;
                let s = self.cpu.state_mut();
                s.cr0 = (s.cr0 & !keep) | (v & keep);
                if (old ^ v) & (cr::CR0_PG | cr::CR0_WP) != 0 {
                    self.reset_shadow();
                }
            }
            2 => self.v.cr2 = v,
            3 => {
                self.v.cr3 = v;
                self.stats.cr3_switches += 1;
                self.reset_shadow();
            }
            4 => {
                if v & cr::CR4_PAE != 0 {
                    return Err(unsupported(
                        "the guest enabled PAE paging, which the software CPU does not implement yet",
                    ));
                }
                let old = self.v.cr4;
                self.v.cr4 = v;
                let keep = cr::CR4_TSD | cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT;
                let s = self.cpu.state_mut();
                s.cr4 = (s.cr4 & !keep) | (v & keep);
                if (old ^ v) & (cr::CR4_PSE | cr::CR4_PGE) != 0 {
                    self.reset_shadow();
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn msr(&mut self, machine: &mut Machine, i: &Instruction, code: u32) -> Handled {
        let st = self.cpu.state().clone();
        let ecx = st.gpr[1] as u32;
        let value = (st.gpr[2] << 32) | (st.gpr[0] & 0xffff_ffff);
        let icount = self.cpu.icount;
        let m = &mut self.v.msr;
        let write = i.mnemonic() == Mnemonic::Wrmsr;
        let slot: Option<&mut u64> = match ecx {
            0x174 => Some(&mut m.sysenter_cs),
            0x175 => Some(&mut m.sysenter_esp),
            0x176 => Some(&mut m.sysenter_eip),
            0x1b => Some(&mut m.apic_base),
            0x277 => Some(&mut m.pat),
            0x1a0 => Some(&mut m.misc_enable),
            0x10 => Some(&mut m.tsc_offset),
            _ => None,
        };
        let Some(slot) = slot else {
            return self.reflect_gp(code, "RDMSR/WRMSR of an MSR the virtual CPU lacks");
        };
        if write {
            if ecx == 0x10 {
                *slot = value.wrapping_sub(machine.tsc(icount));
            } else {
                *slot = value;
            }
        } else {
            let v = if ecx == 0x10 {
                machine.tsc(icount).wrapping_add(*slot)
            } else {
                *slot
            };
            self.cpu.set_gpr(0, v & 0xffff_ffff);
            self.cpu.set_gpr(2, v >> 32);
        }
        self.count(if write { "#GP wrmsr" } else { "#GP rdmsr" });
        self.skip(i);
        Ok(Flow::Continue)
    }
}
