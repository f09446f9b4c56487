//! Delivering interrupts and exceptions into the guest through its own
//! IDT, with the checks and nested faults of the CPU's own delivery.

use super::*;

impl Trap {
    /// Delivers an event through the guest's IDT at virtual ring 0, as the
    /// CPU would at ring 0: gate checks, the stack switch through the
    /// guest's TSS, the frame (with the guest-visible EFLAGS), IF cleared
    /// by interrupt gates.
    pub(crate) fn deliver(&mut self, ev: Event) -> Handled {
        match self.try_deliver(ev) {
            Ok(()) => {
                if let Event::Soft(..) | Event::Icebp(_) = ev {
                    // The INT instruction retired with its delivery.
                    self.cpu.icount += 1;
                }
                Ok(Flow::Continue)
            }
            Err(e) => {
                let (vector, _) = match ev {
                    Event::Exception(v, c) => (v, c),
                    Event::Soft(v, _) | Event::External(v) => (v, None),
                    Event::Icebp(_) => (1, None),
                };
                if vector == 8 {
                    return Ok(Flow::Exit(VmExit::Shutdown {
                        reason: format!(
                            "triple fault: the guest's double-fault handler cannot be delivered ({e})"
                        ),
                    }));
                }
                if let Some((next, code)) = self.nested(vector, &e) {
                    return self.deliver(Event::Exception(next, code));
                }
                Ok(Flow::Exit(VmExit::Shutdown {
                    reason: format!("cannot deliver vector {vector} to the guest: {e}"),
                }))
            }
        }
    }

    /// The exception that replaces an undeliverable one.
    pub(crate) fn nested(&mut self, vector: u8, e: &DeliveryError) -> Option<(u8, Option<u32>)> {
        let (v, code) = match *e {
            DeliveryError::Fault(v, code) => (v, code),
            DeliveryError::Unsupported(_) => return None,
        };
        // SDM table 6-5: which pairs make a double fault.
        let contributory = |x: u8| matches!(x, 0 | 10 | 11 | 12 | 13);
        let double = (contributory(vector) && contributory(v))
            || (vector == 14 && (v == 14 || contributory(v)));
        Some(if double { (8, Some(0)) } else { (v, code) })
    }

    pub(crate) fn try_deliver(&mut self, ev: Event) -> Result<(), DeliveryError> {
        let (vector, code, ext, soft_next) = match ev {
            // A fault while delivering an exception or an interrupt (not
            // INT n) has EXT set in its error code (SDM 6.13).
            Event::Exception(v, c) => (v, c, true, None),
            Event::Soft(v, next) => (v, None, false, Some(next)),
            Event::Icebp(next) => (1, None, false, Some(next)),
            Event::External(v) => (v, None, true, None),
        };
        let ext_bit = ext as u32;
        let idt_err = (vector as u32) * 8 + 2 + ext_bit;
        if (vector as u32) * 8 + 7 > self.v.idtr.limit as u32 {
            return Err(DeliveryError::Fault(13, Some(idt_err)));
        }
        let mut g = [0u8; 8];
        self.guest_read(
            (self.v.idtr.base as u32).wrapping_add(vector as u32 * 8),
            &mut g,
        )
        .map_err(|(lin, err)| self.pf(lin, err))?;
        let lo = u32::from_le_bytes(g[..4].try_into().unwrap());
        let hi = u32::from_le_bytes(g[4..].try_into().unwrap());
        let ty = (hi >> 8) & 0x1f;
        let gate_dpl = ((hi >> 13) & 3) as u8;
        let real_cpl = self.cpu.cpl();
        let vcpl = if real_cpl == 3 { 3 } else { 0 };
        if !matches!(ty, 0xe | 0xf) {
            if ty == 0x5 {
                return Err(DeliveryError::Unsupported(
                    "task gates are not virtualized by trap",
                ));
            }
            if matches!(ty, 0x6 | 0x7) {
                return Err(DeliveryError::Unsupported(
                    "16-bit gates are not virtualized by trap",
                ));
            }
            return Err(DeliveryError::Fault(13, Some(idt_err)));
        }
        if soft_next.is_some() && !matches!(ev, Event::Icebp(_)) && gate_dpl < vcpl {
            return Err(DeliveryError::Fault(13, Some(idt_err)));
        }
        if hi & (1 << 15) == 0 {
            return Err(DeliveryError::Fault(11, Some(idt_err)));
        }
        let sel = (lo >> 16) as u16;
        let offset = (lo & 0xffff) | (hi & 0xffff_0000);
        let d = self
            .guest_descriptor(sel)
            .filter(|d| d.is_code_data() && d.is_code())
            .ok_or(DeliveryError::Fault(13, Some((sel & !3) as u32 + ext_bit)))?;
        if !d.present() {
            return Err(DeliveryError::Fault(11, Some((sel & !3) as u32 + ext_bit)));
        }
        let target_dpl = if d.conforming() { vcpl } else { d.dpl() };
        if target_dpl != 0 && target_dpl != vcpl {
            return Err(DeliveryError::Unsupported(
                "a handler outside ring 0 and the interrupted ring",
            ));
        }
        let st = self.cpu.state().clone();
        let eip = soft_next.unwrap_or(st.rip) as u32;
        let image = self.eflags_image();
        // The guest sees its own CS in the frame (RPL 0 at virtual ring 0),
        // so its IRET back to ring 0 faults and is emulated, restoring IF.
        let cs_real = if real_cpl == 1 {
            st.seg[seg::CS].selector & !3
        } else {
            st.seg[seg::CS].selector
        };
        let (new_ss, new_esp, frame): (Option<u16>, u32, Vec<u32>) = if target_dpl < vcpl {
            // To ring 0 from ring 3: the stack from the guest's TSS.
            let tss = self.v.tr.base as u32;
            let esp0 = self
                .read_u32_lin(tss.wrapping_add(4))
                .map_err(|(l, e)| self.pf(l, e))?;
            let ss0 = self
                .read_u32_lin(tss.wrapping_add(8))
                .map_err(|(l, e)| self.pf(l, e))? as u16;
            let mut f = vec![
                st.seg[seg::SS].selector as u32,
                st.gpr[4] as u32,
                image,
                cs_real as u32,
                eip,
            ];
            if let Some(c) = code {
                f.push(c);
            }
            (Some(ss0), esp0, f)
        } else {
            let mut f = vec![image, cs_real as u32, eip];
            if let Some(c) = code {
                f.push(c);
            }
            (None, st.gpr[4] as u32, f)
        };
        let ss_seg = match new_ss {
            Some(s) => self
                .shadow_segment(s)
                .filter(|sg| sg.present())
                .ok_or(DeliveryError::Fault(10, Some((s & !3) as u32 + ext_bit)))?,
            None => st.seg[seg::SS],
        };
        let bytes: Vec<u8> = frame.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
        // A 16-bit stack (B = 0) moves SP only, wrapping at 64 KiB.
        let sp_mask: u32 = if ss_seg.big() { u32::MAX } else { 0xffff };
        let esp = new_esp.wrapping_sub(bytes.len() as u32) & sp_mask;
        // The whole frame within the stack segment's limit (a frame that
        // wraps around the top of the stack does not fit either): #SS,
        // with the new SS selector when the stack was switched.
        let len = bytes.len() as u32;
        let fits = esp as u64 + len as u64 <= sp_mask as u64 + 1
            && popek_cpu::Cpu::seg_value_lin(&ss_seg, esp, 1).is_some()
            && popek_cpu::Cpu::seg_value_lin(&ss_seg, esp + (len - 1), 1).is_some();
        if !fits {
            let top = (ss_seg.base as u32 as u64) + esp as u64 + len as u64;
            if top > VMM_LINEAR as u64 {
                // Where the monitor's 4 MiB cut the guest's stack short.
                self.count("#SS monitor-area frame (reflected)");
            }
            let sel = new_ss.map_or(0, |s| (s & !3) as u32);
            return Err(DeliveryError::Fault(12, Some(sel + ext_bit)));
        }
        let lin = (ss_seg.base as u32).wrapping_add(esp);
        self.guest_write(lin, &bytes)
            .map_err(|(l, e)| self.pf(l, e))?;
        let cs_seg = self
            .shadow_segment(sel)
            .ok_or(DeliveryError::Fault(13, Some((sel & !3) as u32)))?;
        let s = self.cpu.state_mut();
        s.seg[seg::CS] = cs_seg;
        if new_ss.is_some() {
            s.seg[seg::SS] = ss_seg;
        }
        let upper = if new_ss.is_some() {
            new_esp as u64
        } else {
            s.gpr[4] & 0xffff_ffff
        } & !(sp_mask as u64);
        s.gpr[4] = upper | esp as u64;
        s.rip = offset as u64;
        s.rflags &= !((flags::TF | flags::NT | flags::RF | flags::VM) as u64);
        s.halted = false;
        if ty == 0xe {
            self.v.vif = false;
        }
        self.v.halted = false;
        self.stats.reflected += 1;
        self.set_view(false);
        Ok(())
    }

    pub(crate) fn pf(&mut self, lin: u32, err: u32) -> DeliveryError {
        self.v.cr2 = lin as u64;
        DeliveryError::Fault(14, Some(err))
    }
}

/// Why an event could not be delivered.
#[derive(Debug)]
pub(crate) enum DeliveryError {
    /// Delivery raised this exception.
    Fault(u8, Option<u32>),
    /// The guest needs something trap does not virtualize.
    Unsupported(&'static str),
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::Fault(v, c) => write!(f, "{} ({c:?})", vector_name(*v)),
            DeliveryError::Unsupported(s) => f.write_str(s),
        }
    }
}
