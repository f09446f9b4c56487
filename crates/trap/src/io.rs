//! Port I/O at virtual ring 0 or under the guest's IOPL and I/O bitmap:
//! IN/OUT and the string forms, emulated against the machine, and the
//! hypercall doorbell.

use super::*;

impl Trap {
    /// The guest TSS's I/O permission bitmap (what ring 3 may access).
    pub(crate) fn io_permitted(&self, port: u16, size: u8) -> bool {
        let tss = self.v.tr.base as u32;
        let limit = self.v.tr.limit;
        let mut b = [0u8; 2];
        if limit < 0x67 || self.guest_read(tss.wrapping_add(0x66), &mut b).is_err() {
            return false;
        }
        let base = u16::from_le_bytes(b) as u32;
        let first = base + port as u32 / 8;
        if first + 1 > limit {
            return false;
        }
        let mut w = [0u8; 2];
        if self.guest_read(tss.wrapping_add(first), &mut w).is_err() {
            return false;
        }
        let bits = u16::from_le_bytes(w) >> (port % 8);
        bits & ((1 << size) - 1) == 0
    }

    pub(crate) fn port_io(&mut self, machine: &mut Machine, i: &Instruction, vcpl: u8) -> Handled {
        use Mnemonic::*;
        let eip = self.cpu.state().rip;
        let (port, size) = io_operands(self, i);
        match i.mnemonic() {
            In => {
                if vcpl == 0
                    && port == HYPERCALL_PORT
                    && size == 4
                    && i.op1_register() == Register::DX
                {
                    let nr = self.cpu.state().gpr[0] as u32;
                    if nr == 0 {
                        // A guest that asks for the ABI is paravirtual and
                        // invalidates after its PTE changes.
                        self.pv_mmu = true;
                    }
                    self.count("#GP hypercall");
                    if self.trace {
                        const NAMES: [&str; 18] = [
                            "VERSION",
                            "CONSOLE_WRITE",
                            "EXIT",
                            "POWER_OFF",
                            "IRQ_DISABLE",
                            "IRQ_ENABLE",
                            "SAVE_FL",
                            "RESTORE_FL",
                            "HALT",
                            "WRITE_CR3",
                            "READ_CR3",
                            "READ_CR2",
                            "INVLPG",
                            "LOAD_GDT",
                            "LOAD_IDT",
                            "LOAD_TR",
                            "PORT_IN",
                            "PORT_OUT",
                        ];
                        let name = NAMES.get(nr as usize).copied().unwrap_or("unknown");
                        self.trace_line("#GP", eip, &format!("hypercall {nr} (HC_{name})"));
                    }
                    self.skip(i);
                    return Ok(Flow::Exit(VmExit::Hypercall));
                }
                machine.device_time(self.cpu.icount);
                let v = machine.io_in(port, size) as u64;
                self.set_reg(i.op0_register(), v);
                self.count("#GP in");
                if self.trace {
                    self.trace_line("#GP", eip, &format!("port {port:#x} read {v:#x}"));
                }
            }
            Out => {
                let v = self.reg(i.op1_register()) as u32;
                machine.device_time(self.cpu.icount);
                machine.io_out(port, size, v);
                self.count("#GP out");
                if self.trace {
                    self.trace_line("#GP", eip, &format!("port {port:#x} := {v:#x}"));
                }
            }
            _ => return self.string_io(machine, i, port, size),
        }
        self.skip(i);
        if machine.stop_pending() {
            return Ok(Flow::Exit(VmExit::MachineStop));
        }
        Ok(Flow::Continue)
    }

    pub(crate) fn string_io(
        &mut self,
        machine: &mut Machine,
        i: &Instruction,
        port: u16,
        size: u8,
    ) -> Handled {
        let input = matches!(
            i.mnemonic(),
            Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd
        );
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let a32 = (0..i.op_count())
            .any(|k| matches!(i.op_kind(k), OpKind::MemoryESEDI | OpKind::MemorySegESI));
        let amask: u64 = if a32 { 0xffff_ffff } else { 0xffff };
        let st = self.cpu.state().clone();
        let df = st.rflags & flags::DF as u64 != 0;
        let mut count = if rep { st.gpr[1] & amask } else { 1 };
        let (idx, sreg) = if input {
            (7usize, seg::ES)
        } else {
            let s = match i.memory_segment() {
                Register::ES => seg::ES,
                Register::CS => seg::CS,
                Register::SS => seg::SS,
                Register::FS => seg::FS,
                Register::GS => seg::GS,
                _ => seg::DS,
            };
            (6usize, s)
        };
        // The guest's view of the segment (limits as it wrote them, not
        // cut below the monitor's area: the accesses go through the guest's
        // page tables).
        let segment = self.compose().seg[sreg];
        let seg_base = segment.base;
        let mut ptr = st.gpr[idx] & amask;
        let mut done = 0u64;
        // The CPU's own REP pauses after the same number of iterations, or
        // after a device asked to stop.
        while count > 0 && done < popek_cpu::REP_CHUNK as u64 && !machine.stop_pending() {
            // What the CPU checks of the memory operand once the I/O is
            // allowed (ring 0): a usable segment and its limit (#SS for SS).
            use popek_cpu::state::attr::{CODE, RW};
            let code = segment.attr & CODE != 0;
            let rw = segment.attr & RW != 0;
            let usable = segment.present()
                && if input { !code && rw } else { !code || rw }
                && popek_cpu::Cpu::seg_value_lin(&segment, ptr as u32, size).is_some();
            if !usable {
                self.save_string(idx, ptr, rep, count, amask);
                let v = if sreg == seg::SS { 12 } else { 13 };
                return self.deliver(Event::Exception(v, Some(0)));
            }
            let lin = (seg_base + ptr) as u32;
            machine.device_time(self.cpu.icount);
            if input {
                let v = machine.io_in(port, size);
                if let Err((l, e)) = self.guest_write(lin, &v.to_le_bytes()[..size as usize]) {
                    self.v.cr2 = l as u64;
                    self.save_string(idx, ptr, rep, count, amask);
                    return self.deliver(Event::Exception(14, Some(e)));
                }
            } else {
                let mut b = [0u8; 4];
                if let Err((l, e)) = self.guest_read(lin, &mut b[..size as usize]) {
                    self.v.cr2 = l as u64;
                    self.save_string(idx, ptr, rep, count, amask);
                    return self.deliver(Event::Exception(14, Some(e)));
                }
                machine.io_out(port, size, u32::from_le_bytes(b));
            }
            ptr = if df {
                ptr.wrapping_sub(size as u64)
            } else {
                ptr + size as u64
            } & amask;
            count -= 1;
            done += 1;
        }
        self.save_string(idx, ptr, rep, count, amask);
        if count == 0 {
            self.skip(i);
        } else {
            // A paused REP counts as a retired instruction on the CPU too
            // (each chunk), and is executed again from the same EIP.
            self.cpu.icount += 1;
        }
        self.count(if input { "#GP ins" } else { "#GP outs" });
        if machine.stop_pending() {
            return Ok(Flow::Exit(VmExit::MachineStop));
        }
        Ok(Flow::Continue)
    }

    pub(crate) fn save_string(&mut self, idx: usize, ptr: u64, rep: bool, count: u64, amask: u64) {
        let st = self.cpu.state();
        let p = (st.gpr[idx] & !amask) | ptr;
        let c = (st.gpr[1] & !amask) | count;
        self.cpu.set_gpr(idx, p);
        if rep {
            self.cpu.set_gpr(1, c);
        }
    }
}

/// The port and access size of an I/O instruction.
pub(crate) fn io_operands(t: &mut Trap, i: &Instruction) -> (u16, u8) {
    use Mnemonic::*;
    let dx = t.reg(Register::DX) as u16;
    match i.mnemonic() {
        In => {
            let size = i.op0_register().size() as u8;
            let port = if i.op1_kind() == OpKind::Immediate8 {
                i.immediate8() as u16
            } else {
                dx
            };
            (port, size)
        }
        Out => {
            let size = i.op1_register().size() as u8;
            let port = if i.op0_kind() == OpKind::Immediate8 {
                i.immediate8() as u16
            } else {
                dx
            };
            (port, size)
        }
        Insb | Outsb => (dx, 1),
        Insw | Outsw => (dx, 2),
        _ => (dx, 4),
    }
}
