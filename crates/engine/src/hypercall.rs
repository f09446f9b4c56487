//! The hypercall ABI (`docs/hypercalls.md`): the doorbell port every
//! engine watches, the call numbers, and the host side that serves a call
//! once an engine stops at the doorbell with [`VmExit::Hypercall`].
//!
//! [`VmExit::Hypercall`]: crate::VmExit::Hypercall

use popek_cpu::state::{cr, flags};
use popek_machine::{Machine, StopReason};

use crate::Engine;

/// The port the hypercall doorbell listens on.
pub const HYPERCALL_PORT: u16 = 0x5650;

/// ABI version reported by `HC_VERSION`.
pub const VERSION: u32 = 1;

const ENOSYS: i32 = -38;
const EINVAL: i32 = -22;
const EFAULT: i32 = -14;

/// Hypercall numbers.
pub mod nr {
    /// ABI version.
    pub const VERSION: u32 = 0;
    /// Write bytes to the console.
    pub const CONSOLE_WRITE: u32 = 1;
    /// End the VM with a status.
    pub const EXIT: u32 = 2;
    /// Power off.
    pub const POWER_OFF: u32 = 3;
    /// Disable interrupts, return the previous IF.
    pub const IRQ_DISABLE: u32 = 4;
    /// Enable interrupts, return the previous IF.
    pub const IRQ_ENABLE: u32 = 5;
    /// Read IF.
    pub const SAVE_FL: u32 = 6;
    /// Restore IF.
    pub const RESTORE_FL: u32 = 7;
    /// Enable interrupts and wait for one.
    pub const HALT: u32 = 8;
    /// Load CR3 (and enable paging on the first call).
    pub const WRITE_CR3: u32 = 9;
    /// Read CR3.
    pub const READ_CR3: u32 = 10;
    /// Read CR2.
    pub const READ_CR2: u32 = 11;
    /// Invalidate one page.
    pub const INVLPG: u32 = 12;
    /// Load the GDT register.
    pub const LOAD_GDT: u32 = 13;
    /// Load the IDT register.
    pub const LOAD_IDT: u32 = 14;
    /// Load the task register.
    pub const LOAD_TR: u32 = 15;
    /// Port input.
    pub const PORT_IN: u32 = 16;
    /// Port output.
    pub const PORT_OUT: u32 = 17;
}

/// Per-number call counts, for statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HypercallStats {
    /// Calls by number (unknown numbers counted in the last slot).
    pub calls: [u64; 19],
}

/// Serves the hypercall in the engine's registers. Returns a stop reason
/// when the call ends the VM.
pub fn serve(
    engine: &mut dyn Engine,
    machine: &mut Machine,
    stats: &mut HypercallStats,
) -> Option<StopReason> {
    let mut s = engine.state();
    let n = s.gpr[0] as u32;
    let (b, c, si) = (s.gpr[3] as u32, s.gpr[1] as u32, s.gpr[6] as u32);
    stats.calls[(n as usize).min(18)] += 1;
    let ram_size = machine.ram().size();
    let in_ram = |addr: u64, len: u64| addr.checked_add(len).is_some_and(|e| e <= ram_size);
    let if_bit = (s.rflags & flags::IF as u64) as i32;
    let mut stop = None;
    let ret: i32 = match n {
        nr::VERSION => VERSION as i32,
        nr::CONSOLE_WRITE => {
            if c > 65536 {
                EINVAL
            } else if !in_ram(b as u64, c as u64) {
                EFAULT
            } else {
                let mut buf = vec![0u8; c as usize];
                if machine.ram().read(b as u64, &mut buf).is_err() {
                    EFAULT
                } else {
                    for byte in buf {
                        machine.io_out(0x3f8, 1, byte as u32);
                    }
                    c as i32
                }
            }
        }
        nr::EXIT => {
            stop = Some(StopReason::DebugExit(b as u8));
            0
        }
        nr::POWER_OFF => {
            stop = Some(StopReason::PowerOff);
            0
        }
        nr::IRQ_DISABLE => {
            s.rflags &= !(flags::IF as u64);
            if_bit
        }
        nr::IRQ_ENABLE => {
            s.rflags |= flags::IF as u64;
            if_bit
        }
        nr::SAVE_FL => if_bit,
        nr::RESTORE_FL => {
            s.rflags = (s.rflags & !(flags::IF as u64)) | (b & flags::IF) as u64;
            0
        }
        nr::HALT => {
            s.rflags |= flags::IF as u64;
            s.halted = true;
            0
        }
        nr::WRITE_CR3 => {
            if b & 0xfff != 0 {
                EINVAL
            } else if !in_ram(b as u64, 4096) {
                EFAULT
            } else {
                s.cr3 = b as u64;
                s.cr0 |= cr::CR0_PG | cr::CR0_PE;
                0
            }
        }
        nr::READ_CR3 => s.cr3 as i32,
        nr::READ_CR2 => s.cr2 as i32,
        nr::INVLPG => {
            // set_state below flushes interp's and bt's TLB; a shadow-paging
            // engine drops that page's shadow entry here.
            engine.invalidate_page(b as u64);
            0
        }
        nr::LOAD_GDT | nr::LOAD_IDT => {
            if c > 0xffff {
                EINVAL
            } else {
                let t = if n == nr::LOAD_GDT {
                    &mut s.gdtr
                } else {
                    &mut s.idtr
                };
                t.base = b as u64;
                t.limit = c as u16;
                0
            }
        }
        nr::LOAD_TR => load_tr(engine, &mut s, b),
        nr::PORT_IN => match (u16::try_from(b), c) {
            (Ok(port), 1 | 2 | 4) => machine.io_in(port, c as u8) as i32,
            _ => EINVAL,
        },
        nr::PORT_OUT => match (u16::try_from(b), c) {
            (Ok(port), 1 | 2 | 4) => {
                machine.io_out(port, c as u8, si);
                0
            }
            _ => EINVAL,
        },
        _ => ENOSYS,
    };
    s.gpr[0] = ret as u32 as u64;
    if engine.set_state(s).is_err() {
        return Some(StopReason::DebugExit(0x7f));
    }
    stop.or_else(|| machine.take_stop())
}

fn load_tr(engine: &mut dyn Engine, s: &mut popek_cpu::CpuState, sel: u32) -> i32 {
    if sel > 0xffff || sel & 4 != 0 || sel & !7 == 0 || (sel & !7) + 7 > s.gdtr.limit as u32 {
        return EINVAL;
    }
    let addr = s.gdtr.base + (sel & !7) as u64;
    let mut d = [0u8; 8];
    if engine.peek_linear(addr, &mut d).is_none() {
        return EFAULT;
    }
    let lo = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    let hi = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
    let desc = popek_cpu::seg::Descriptor { lo, hi };
    if desc.is_code_data() || desc.typ() != 9 || !desc.present() {
        return EINVAL;
    }
    let busy = hi | (2 << 8);
    if engine.poke_linear(addr + 4, &busy.to_le_bytes()).is_none() {
        return EFAULT;
    }
    s.tr = desc.to_segment(sel as u16);
    s.tr.attr |= 2;
    0
}
