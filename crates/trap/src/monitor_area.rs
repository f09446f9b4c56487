//! Guest accesses that land in the monitor's share of the linear space
//! (the top 4 MiB): emulated against the guest's own memory where the
//! guest would have reached it, refused where it could not.

use super::*;

impl Trap {
    /// A #GP(0) from an access that the guest's segment allows but that
    /// reaches the monitor's linear area (the top 4 MiB, which the shadow
    /// segments stop short of): the guest kernel's MOV loads and stores
    /// are emulated through its page tables (as the CPU would have done
    /// them at ring 0); anything else gets the #GP, counted as a trap of
    /// its own. `None`: not such an access.
    pub(crate) fn monitor_area_access(&mut self, i: &Instruction, real_cpl: u8) -> Option<Handled> {
        use iced_x86::Code::*;
        let op = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        let size = i.memory_size().size() as u32;
        let lin = self.mem_linear(i)?;
        if size == 0 || (lin as u64 + size as u64 - 1) < VMM_LINEAR as u64 {
            return None;
        }
        let s = match i.memory_segment() {
            Register::ES => seg::ES,
            Register::CS => seg::CS,
            Register::SS => seg::SS,
            Register::FS => seg::FS,
            Register::GS => seg::GS,
            _ => seg::DS,
        };
        let guest = self.compose().seg[s];
        let off = lin.wrapping_sub(guest.base as u32);
        let write = op == 0 && i.mnemonic() != Mnemonic::Cmp && i.mnemonic() != Mnemonic::Test;
        let usable = guest.present()
            && (guest.attr & popek_cpu::state::attr::CODE == 0 || !write)
            && popek_cpu::Cpu::seg_value_lin(&guest, off, size as u8).is_some();
        if !usable {
            return None;
        }
        let eip = self.cpu.state().rip;
        let emulated = real_cpl != 3
            && matches!(
                i.code(),
                Mov_r8_rm8
                    | Mov_r16_rm16
                    | Mov_r32_rm32
                    | Mov_rm8_r8
                    | Mov_rm16_r16
                    | Mov_rm32_r32
                    | Mov_rm8_imm8
                    | Mov_rm16_imm16
                    | Mov_rm32_imm32
                    | Mov_AL_moffs8
                    | Mov_AX_moffs16
                    | Mov_EAX_moffs32
                    | Mov_moffs8_AL
                    | Mov_moffs16_AX
                    | Mov_moffs32_EAX
                    | Movzx_r16_rm8
                    | Movzx_r32_rm8
                    | Movzx_r32_rm16
                    | Movsx_r16_rm8
                    | Movsx_r32_rm8
                    | Movsx_r32_rm16
            );
        if !emulated {
            self.count("#GP monitor-area access (reflected)");
            if self.trace {
                self.trace_line(
                    "#GP",
                    eip,
                    &format!("{lin:#x}: the monitor's linear area; only kernel MOVs are emulated: #GP reflected"),
                );
            }
            return Some(self.deliver(Event::Exception(13, Some(0))));
        }
        let result = if op == 0 {
            let v = if i.op1_kind() == OpKind::Register {
                self.reg(i.op1_register())
            } else {
                i.immediate(1)
            };
            self.guest_write(lin, &v.to_le_bytes()[..size as usize])
                .map(|()| format!("{size}-byte store to {lin:#x} emulated"))
        } else {
            let mut b = [0u8; 8];
            self.guest_read(lin, &mut b[..size as usize]).map(|()| {
                let raw = u64::from_le_bytes(b);
                let v = match i.mnemonic() {
                    Mnemonic::Movsx => {
                        let sh = 64 - size * 8;
                        (((raw << sh) as i64) >> sh) as u64
                    }
                    _ => raw,
                };
                self.set_reg(i.op0_register(), v);
                format!("{size}-byte load from {lin:#x} emulated")
            })
        };
        Some(match result {
            Ok(what) => {
                self.count("#GP monitor-area access (emulated)");
                if self.trace {
                    self.trace_line("#GP", eip, &what);
                }
                self.skip(i);
                Ok(Flow::Continue)
            }
            Err((l, e)) => {
                self.v.cr2 = l as u64;
                self.deliver(Event::Exception(14, Some(e)))
            }
        })
    }
}
