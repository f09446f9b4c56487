//! Segment loads and far transfers that ring compression makes fault:
//! SS loads, same-ring returns, user segments shown to ring 3, kernel
//! code used as data, far transfers to kernel code.

use super::*;

impl Trap {
    pub(crate) fn load_ss(&mut self, i: &Instruction, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let mut pop_size = 0u64;
        let (sel, pop) = match (i.mnemonic(), i.op1_kind()) {
            (Mnemonic::Pop, _) => {
                let st = self.cpu.state();
                let lin = (st.seg[seg::SS].base + (st.gpr[4] & 0xffff_ffff)) as u32;
                pop_size = if i.code() == iced_x86::Code::Popw_SS {
                    2
                } else {
                    4
                };
                match self.read_u32_lin(lin) {
                    Ok(v) => (v as u16, true),
                    Err((l, e)) => {
                        self.v.cr2 = l as u64;
                        return self.deliver(Event::Exception(14, Some(e)));
                    }
                }
            }
            (_, OpKind::Register) => (self.reg(i.op1_register()) as u16, false),
            (Mnemonic::Mov, OpKind::Memory) => {
                let mut b = [0u8; 2];
                if let Err(flow) = self.operand(i, &mut b, code, "MOV SS") {
                    return flow;
                }
                (u16::from_le_bytes(b), false)
            }
            _ => return self.reflect_gp(code, "LSS is not emulated"),
        };
        // At virtual ring 0: RPL 0, a writable data segment with DPL 0.
        let ok = sel & 3 == 0
            && self
                .guest_descriptor(sel)
                .is_some_and(|d| d.is_code_data() && d.writable_data() && d.dpl() == 0);
        let Some(sg) = self.shadow_segment(sel).filter(|_| ok) else {
            return self.reflect_gp(
                (sel & !3) as u32,
                "MOV SS of a selector ring 0 may not load",
            );
        };
        if !sg.present() {
            self.count("#SS reflected");
            return self.deliver(Event::Exception(12, Some((sel & !3) as u32)));
        }
        self.skip(i);
        // The pop moves SP only on a 16-bit stack (the old SS's B bit).
        let sp_mask: u64 = if self.cpu.state().seg[seg::SS].big() {
            0xffff_ffff
        } else {
            0xffff
        };
        let s = self.cpu.state_mut();
        s.seg[seg::SS] = sg;
        if pop {
            s.gpr[4] = (s.gpr[4] & !sp_mask) | ((s.gpr[4] + pop_size) & sp_mask);
        }
        self.inhibit = true;
        self.count("#GP mov ss");
        if self.trace {
            self.trace_line(
                "#GP",
                eip,
                &format!("SS := {sel:#x}, loaded at ring 1 as {:#x}", sel | 1),
            );
        }
        Ok(Flow::Continue)
    }

    /// IRET/RETF at virtual ring 0 to a selector with RPL 0 (which the real
    /// ring 1 refuses): emulated, including IF from the popped EFLAGS.
    pub(crate) fn same_ring_return(&mut self, i: &Instruction, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let st = self.cpu.state().clone();
        use iced_x86::Code;
        let size: u32 = match i.code() {
            Code::Iretd | Code::Retfd | Code::Retfd_imm16 => 4,
            _ => 2,
        };
        let iret = i.mnemonic() != Mnemonic::Retf;
        // A 16-bit stack (B = 0) moves SP only, wrapping at 64 KiB.
        let sp_mask: u32 = if st.seg[seg::SS].big() {
            u32::MAX
        } else {
            0xffff
        };
        let esp = st.gpr[4] as u32 & sp_mask;
        let base = st.seg[seg::SS].base as u32;
        let mut frame = vec![0u8; (size * 3) as usize];
        if let Err((l, e)) = self.guest_read(base.wrapping_add(esp), &mut frame) {
            self.v.cr2 = l as u64;
            return self.deliver(Event::Exception(14, Some(e)));
        }
        let word = |k: usize| -> u32 {
            if size == 4 {
                u32::from_le_bytes(frame[k * 4..k * 4 + 4].try_into().unwrap())
            } else {
                u16::from_le_bytes(frame[k * 2..k * 2 + 2].try_into().unwrap()) as u32
            }
        };
        let (new_eip, sel) = (word(0), word(1) as u16);
        // RPL 1 is ring 0's selector as the real CPU showed it (PUSH CS).
        if sel & 3 > 1 {
            return self.reflect_gp(code, "far return to an outer ring");
        }
        let ok = self
            .guest_descriptor(sel)
            .is_some_and(|d| d.is_code_data() && d.is_code() && d.present() && d.dpl() == 0);
        let Some(cs) = self.shadow_segment(sel).filter(|_| ok) else {
            return self.reflect_gp((sel & !3) as u32, "far return to a bad code segment");
        };
        let mut pop = size * 2;
        let mut new_flags = None;
        if iret {
            let f = word(2);
            self.v.vif = f & flags::IF != 0;
            self.v.iopl = ((f >> 12) & 3) as u8;
            new_flags = Some(f);
            pop += size;
        } else if i.op_count() == 1 && i.op0_kind() == OpKind::Immediate16 {
            pop += i.immediate16() as u32;
        }
        // The emulated return retires, as on the CPU (the guest's clock
        // counts it).
        self.cpu.icount += 1;
        let s = self.cpu.state_mut();
        s.seg[seg::CS] = cs;
        s.rip = new_eip as u64;
        s.gpr[4] = (s.gpr[4] & !(sp_mask as u64)) | (esp.wrapping_add(pop) & sp_mask) as u64;
        if let Some(f) = new_flags {
            let mask = if size == 4 { 0x0025_4fd5u32 } else { 0x4fd5 };
            let f = (f & mask & !(flags::IF | flags::IOPL)) | flags::IF | flags::FIXED1;
            s.rflags = (s.rflags & !(mask as u64)) | f as u64;
        }
        self.count(if iret {
            "#GP iret to ring 0 (emulated)"
        } else {
            "#GP retf to ring 0 (emulated)"
        });
        if self.trace {
            self.trace_line(
                "#GP",
                eip,
                &format!("return to {sel:#x}:{new_eip:#x} emulated"),
            );
        }
        Ok(Flow::Continue)
    }

    /// #NP: the guest kernel touched one of its DPL-3 segments, hidden while
    /// it runs. An `IRET` to ring 3 is the return to user mode: the monitor
    /// takes the virtual IF and IOPL from the frame, shows the user
    /// segments and lets the CPU execute the `IRET` again.
    pub(crate) fn not_present(&mut self, machine: &mut Machine, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let sel = (code & 0xfffc) as u16;
        let gd = self
            .guest_descriptor(sel)
            .filter(|d| d.is_code_data() && d.present());
        if code & 3 == 0 && gd.is_some_and(|d| d.is_code() && d.dpl() == 0) && self.cpu.cpl() == 1 {
            if let Some(i) = self.fetch().filter(|i| {
                matches!(
                    i.mnemonic(),
                    Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Retf
                )
            }) {
                return self.same_ring_return(&i, code);
            }
            return self.far_to_kernel(sel, code);
        }
        let user_seg = self.cpu.cpl() == 1
            && !self.user_view
            && code & 3 == 0
            && gd.is_some_and(|d| d.dpl() == 3);
        if !user_seg {
            self.count("#NP reflected");
            if self.trace {
                self.trace_line("#NP", eip, "reflected");
            }
            return self.deliver(Event::Exception(11, Some(code)));
        }
        let i = self.fetch();
        if let Some(i) = i.filter(|i| matches!(i.mnemonic(), Mnemonic::Iret | Mnemonic::Iretd)) {
            let size = if i.mnemonic() == Mnemonic::Iretd {
                4
            } else {
                2
            };
            let st = self.cpu.state().clone();
            let lin = (st.seg[seg::SS].base as u32)
                .wrapping_add((st.gpr[4] as u32).wrapping_add(2 * size));
            let f = match self.read_u32_lin(lin) {
                Ok(f) => f,
                Err((l, e)) => {
                    self.v.cr2 = l as u64;
                    return self.deliver(Event::Exception(14, Some(e)));
                }
            };
            self.v.vif = f & flags::IF != 0;
            self.v.iopl = ((f >> 12) & 3) as u8;
            self.count("#NP iret to ring 3");
            if self.trace {
                self.trace_line(
                    "#NP",
                    eip,
                    &format!(
                        "return to user mode: virtual IF := {}, user segments shown, IRET re-executed",
                        self.v.vif as u8
                    ),
                );
            }
            // The CPU executes the IRET itself, now that the user segments
            // are present: its checks are the hardware's.
            return self.step_shown(machine);
        }
        // Another load of a user segment (MOV DS, POP ES...): run it with
        // the user segments shown, then hide them again if still in ring 1.
        self.count("#NP user segment load");
        if self.trace {
            self.trace_line(
                "#NP",
                eip,
                "load of a user segment: run with user segments shown",
            );
        }
        self.step_shown(machine)
    }

    /// Runs one instruction with the user segments shown, then hides them
    /// again if the CPU is still in ring 1.
    pub(crate) fn step_shown(&mut self, machine: &mut Machine) -> Handled {
        if self.depth > 4 {
            // Nested single steps that keep faulting: retry from the run
            // loop (the watchdog ends a true livelock).
            return Ok(Flow::Continue);
        }
        self.set_view(true);
        let was = std::mem::replace(&mut self.emulating, true);
        self.depth += 1;
        let exit = self.run_cpu(machine, 1);
        self.emulating = was;
        let cpl = self.cpu.cpl();
        self.set_view(cpl == 3);
        // Held across `after_run`: nesting is bounded here.
        let flow = self.after_run(machine, exit);
        self.depth -= 1;
        flow
    }

    /// A far JMP or CALL at virtual ring 0 to guest ring-0 code (whose
    /// shadow descriptor is not present): emulated, CS loaded with RPL 1.
    /// MOV or POP of a data segment register with a readable guest
    /// ring-0 code segment: its shadow is marked not present (so that far
    /// transfers to it trap), and the CPU, having checked everything else,
    /// raised #NP. The monitor completes the load.
    pub(crate) fn kernel_code_as_data(
        &mut self,
        i: &Instruction,
        sel: u16,
        eip: u64,
        code: u32,
    ) -> Handled {
        let target = i.op0_register();
        let s = match target {
            Register::ES => seg::ES,
            Register::DS => seg::DS,
            Register::FS => seg::FS,
            Register::GS => seg::GS,
            _ => {
                self.count("#NP reflected");
                return self.deliver(Event::Exception(11, Some(code)));
            }
        };
        let Some(mut sg) = self.shadow_segment(sel) else {
            return self.reflect_gp(code, "a segment the monitor cannot load");
        };
        // A data segment register keeps the selector as loaded (the error
        // code lost its RPL: ring 0's is 0).
        sg.selector = sel;
        use iced_x86::Code::*;
        let pop = match i.code() {
            Popw_ES | Popw_DS | Popw_FS | Popw_GS => 2,
            Popd_ES | Popd_DS | Popd_FS | Popd_GS => 4,
            _ => 0,
        };
        self.skip(i);
        let st = self.cpu.state_mut();
        st.seg[s] = sg;
        if pop > 0 {
            let mask = if st.seg[seg::SS].big() {
                0xffff_ffff
            } else {
                0xffff
            };
            let sp = (st.gpr[4] & mask) + pop;
            st.gpr[4] = (st.gpr[4] & !mask) | (sp & mask);
        }
        self.count("#NP ring-0 code segment loaded as data (emulated)");
        if self.trace {
            self.trace_line(
                "#NP",
                eip,
                &format!("{target:?} := {sel:#x} (ring-0 code as data)"),
            );
        }
        Ok(Flow::Continue)
    }

    pub(crate) fn far_to_kernel(&mut self, sel: u16, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let Some(i) = self.fetch() else {
            return self.deliver(Event::Exception(11, Some(code)));
        };
        let call = match i.mnemonic() {
            Mnemonic::Jmp => false,
            Mnemonic::Call => true,
            Mnemonic::Mov | Mnemonic::Pop => return self.kernel_code_as_data(&i, sel, eip, code),
            _ => {
                self.count("#NP reflected");
                return self.deliver(Event::Exception(11, Some(code)));
            }
        };
        let size: u32 = if popek_cpu::facts::operand_size(i.code()) == 16 {
            2
        } else {
            4
        };
        let (target_sel, off) = match i.op0_kind() {
            OpKind::FarBranch16 => (i.far_branch_selector(), i.far_branch16() as u32),
            OpKind::FarBranch32 => (i.far_branch_selector(), i.far_branch32()),
            OpKind::Memory => {
                let mut b = [0u8; 6];
                match self.read_operand(&i, &mut b[..size as usize + 2]) {
                    None => return self.deliver(Event::Exception(11, Some(code))),
                    Some(Err(ev)) => return self.deliver(ev),
                    Some(Ok(())) => {}
                }
                let off = if size == 4 {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                } else {
                    u16::from_le_bytes([b[0], b[1]]) as u32
                };
                let s = size as usize;
                (u16::from_le_bytes([b[s], b[s + 1]]), off)
            }
            _ => return self.deliver(Event::Exception(11, Some(code))),
        };
        if target_sel & !3 != sel {
            return self.deliver(Event::Exception(11, Some(code)));
        }
        let Some(cs) = self.shadow_segment(target_sel) else {
            return self.reflect_gp((sel & !3) as u32, "far transfer to a bad code segment");
        };
        if call {
            let st = self.cpu.state().clone();
            let ret = i.next_ip() as u32;
            let guest_cs = (st.seg[seg::CS].selector & !3) as u32;
            let frame: Vec<u8> = if size == 4 {
                [ret, guest_cs]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect()
            } else {
                [ret as u16, guest_cs as u16]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect()
            };
            let esp = (st.gpr[4] as u32).wrapping_sub(frame.len() as u32);
            let lin = (st.seg[seg::SS].base as u32).wrapping_add(esp);
            if let Err((l, e)) = self.guest_write(lin, &frame) {
                self.v.cr2 = l as u64;
                return self.deliver(Event::Exception(14, Some(e)));
            }
            self.cpu.set_gpr(4, (st.gpr[4] & !0xffff_ffff) | esp as u64);
        }
        // The emulated transfer retires, as on the CPU.
        self.cpu.icount += 1;
        let s = self.cpu.state_mut();
        s.seg[seg::CS] = cs;
        s.rip = off as u64;
        self.count(if call {
            "#NP far call to ring 0 (emulated)"
        } else {
            "#NP far jmp to ring 0 (emulated)"
        });
        if self.trace {
            self.trace_line(
                "#NP",
                eip,
                &format!(
                    "far transfer to {target_sel:#x}:{off:#x} emulated (CS := {:#x})",
                    cs.selector
                ),
            );
        }
        Ok(Flow::Continue)
    }
}
