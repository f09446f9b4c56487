//! The general-protection trap: which instruction the deprivileged guest
//! ran, and its emulation at virtual ring 0 (privileged instructions,
//! control registers, MSRs), or its reflection to the guest.

use super::*;
use crate::io::io_operands;
use crate::privileged::Emulated;

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
        let op = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        // `reg` gives a segment register's base, a GPR's value.
        i.virtual_address(op, 0, |r, _, _| Some(self.reg(r)))
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

    /// A privileged instruction of the guest kernel (virtual ring 0) that
    /// faulted at real ring 1: emulated on the virtual CPU.
    pub(crate) fn kernel_gp(
        &mut self,
        machine: &mut Machine,
        i: &Instruction,
        code: u32,
    ) -> Handled {
        use Mnemonic::*;
        let eip = self.cpu.state().rip;
        let m = i.mnemonic();
        let reg_op = |k: u32| i.op_kind(k) == OpKind::Register;
        let done: Emulated = match m {
            Cli | Sti => Ok(self.set_virtual_if(m == Sti, eip)),
            Hlt => return self.emulate_hlt(i, eip),
            In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd => {
                return self.port_io(machine, i, 0);
            }
            Mov if reg_op(0) && i.op0_register().is_cr() => return self.mov_to_cr(i, eip),
            Mov if reg_op(1) && i.op1_register().is_cr() => self.mov_from_cr(i, code),
            Mov if reg_op(0) && i.op0_register().is_dr()
                || reg_op(1) && i.op1_register().is_dr() =>
            {
                Ok(self.mov_dr(i))
            }
            Mov | Pop if reg_op(0) && i.op0_register() == Register::SS => {
                return self.load_ss(i, code);
            }
            Clts => {
                self.v.cr0 &= !cr::CR0_TS;
                self.cpu.state_mut().cr0 &= !cr::CR0_TS;
                Ok("virtual CR0.TS := 0".into())
            }
            Lmsw => return self.lmsw(i, code),
            Lgdt | Lidt => self.load_table_register(i, code, m == Lgdt),
            Lldt => self.load_ldtr(i, code),
            Ltr => self.load_tr(i, code),
            Invlpg => match self.mem_linear(i) {
                Some(a) => {
                    self.invlpg(a);
                    Ok(format!("shadow PTE of {a:#x} dropped"))
                }
                None => Err(self.reflect_gp(code, "INVLPG")),
            },
            Wbinvd | Invd => Ok("nothing to do".into()),
            Rdmsr | Wrmsr => return self.msr(machine, i, code),
            Iret | Iretd | Retf => return self.same_ring_return(i, code),
            _ => return self.reflect_gp(code, "not a privileged instruction the monitor emulates"),
        };
        let action = match done {
            Ok(action) => action,
            Err(flow) => return flow,
        };
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
                        "the guest enabled PAE paging: trap's shadow page tables are 32-bit (use bt or interp)",
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
        let write = i.mnemonic() == Mnemonic::Wrmsr;
        if popek_cpu::is_platform_msr(ecx) {
            // The local APIC's registers are the machine's.
            machine.device_time(icount);
            let tsc_offset = self.v.msr.tsc_offset;
            let done = if write {
                let pv = popek_cpu::msr_to_platform(ecx, value, tsc_offset);
                machine.write_msr(0, ecx, pv).map(|r| {
                    if r.is_ok() && ecx == 0x1b {
                        self.v.msr.apic_base = value;
                    }
                    r.is_ok()
                })
            } else {
                machine.read_msr(0, ecx).map(|r| match r {
                    Ok(v) => {
                        let v = popek_cpu::msr_from_platform(ecx, v, tsc_offset);
                        self.cpu.set_gpr(0, v & 0xffff_ffff);
                        self.cpu.set_gpr(2, v >> 32);
                        true
                    }
                    Err(_) => false,
                })
            };
            match done {
                Some(true) => {
                    self.count(if write { "#GP wrmsr" } else { "#GP rdmsr" });
                    self.skip(i);
                    return Ok(Flow::Continue);
                }
                Some(false) => {
                    return self.reflect_gp(code, "a local APIC MSR access the APIC refuses")
                }
                None => {}
            }
        }
        let m = &mut self.v.msr;
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
