//! The CPU's view of everything outside it: port I/O, MMIO, the interrupt
//! line, the clock, and the monitor hooks.
//!
//! The machine does not implement this trait itself (the machine must not
//! depend on the CPU); an engine adapts its machine to it.

use crate::hooks::SensitiveEvent;

/// What the CPU should do after an I/O access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Go on executing.
    Continue,
    /// Finish this instruction, then return [`RunExit::BusStop`](crate::RunExit::BusStop).
    Stop,
}

/// Everything outside the CPU core.
pub trait Bus {
    /// Port input of `size` bytes (1, 2 or 4).
    fn io_in(&mut self, port: u16, size: u8) -> u32;
    /// Port output of `size` bytes.
    fn io_out(&mut self, port: u16, size: u8, value: u32) -> BusAction;
    /// Read of guest-physical memory that is not RAM.
    fn mmio_read(&mut self, addr: u64, size: u8) -> u64;
    /// Write of guest-physical memory that is not RAM.
    fn mmio_write(&mut self, addr: u64, size: u8, value: u64) -> BusAction;
    /// The INTR line: an external interrupt is being requested.
    fn interrupt_pending(&mut self) -> bool {
        false
    }
    /// The INTA cycle: returns the vector of the requested interrupt.
    fn acknowledge_interrupt(&mut self) -> u8 {
        0
    }
    /// The CPU executed PAUSE (a spin-wait loop's hint). A platform with
    /// several vCPUs on one host thread answers [`BusAction::Stop`] so
    /// that the spinning vCPU gives way to the one it waits for (what
    /// VT-x's pause-loop exiting does).
    fn pause(&mut self) -> BusAction {
        BusAction::Continue
    }
    /// The NMI line: a non-maskable interrupt is waiting (the local
    /// APIC's LINT1 or an NMI message).
    fn nmi_pending(&mut self) -> bool {
        false
    }
    /// The CPU takes the pending NMI.
    fn acknowledge_nmi(&mut self) {}
    /// The platform clock the TSC counts from, given the CPU's instruction
    /// count (so a virtual clock can follow execution).
    fn clock(&mut self, instructions: u64) -> u64 {
        instructions
    }
    /// The CPU's instruction count just before it accesses a device (a port
    /// or MMIO), so that a machine on a virtual clock shows the device the
    /// exact time of the access whatever the engine's slices were.
    fn device_time(&mut self, _instructions: u64) {}
    /// RDMSR of a model-specific register the platform implements (the
    /// local APIC's: `IA32_APIC_BASE`, `IA32_TSC_DEADLINE` with the
    /// deadline in platform-clock units, the x2APIC range). `None`: not the
    /// platform's, the CPU answers; `Some(None)`: #GP.
    fn msr_read(&mut self, _msr: u32) -> Option<Option<u64>> {
        None
    }
    /// WRMSR of a platform MSR (see [`msr_read`](Self::msr_read)).
    /// `None`: not the platform's; `Some(false)`: #GP.
    fn msr_write(&mut self, _msr: u32, _value: u64) -> Option<bool> {
        None
    }
    /// Called after a sensitive-unprivileged instruction ran, when
    /// [`Cpu::report_sensitive`](crate::Cpu::report_sensitive) is on. It only
    /// observes: nothing the guest sees changes.
    fn sensitive(&mut self, _event: &SensitiveEvent) {}
}

/// `IA32_TSC_DEADLINE`.
const TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs the platform's local APIC owns: `IA32_APIC_BASE` (0x1B),
/// `IA32_TSC_DEADLINE` (0x6E0) and the x2APIC range (0x800–0x8FF). An
/// engine hands RDMSR and WRMSR of them to the platform
/// ([`Bus::msr_read`], [`Bus::msr_write`]).
pub fn is_platform_msr(n: u32) -> bool {
    matches!(n, 0x1b | TSC_DEADLINE | 0x800..=0x8ff)
}

/// A platform MSR's value as the guest wrote it, in the platform's terms:
/// `IA32_TSC_DEADLINE` counts the platform clock, which the guest's TSC
/// leads by `tsc_offset` (0 still disarms).
pub fn msr_to_platform(n: u32, v: u64, tsc_offset: u64) -> u64 {
    if n == TSC_DEADLINE && v != 0 {
        v.wrapping_sub(tsc_offset).max(1)
    } else {
        v
    }
}

/// The reverse of [`msr_to_platform`], for RDMSR.
pub fn msr_from_platform(n: u32, v: u64, tsc_offset: u64) -> u64 {
    if n == TSC_DEADLINE && v != 0 {
        v.wrapping_add(tsc_offset)
    } else {
        v
    }
}

/// A bus with nothing on it: ports read all-ones, MMIO reads all-ones, no
/// interrupts. Useful for tests and for running user code.
#[derive(Debug, Default)]
pub struct NullBus;

impl Bus for NullBus {
    fn io_in(&mut self, _port: u16, size: u8) -> u32 {
        if size >= 4 {
            u32::MAX
        } else {
            (1u32 << (size * 8)) - 1
        }
    }
    fn io_out(&mut self, _port: u16, _size: u8, _value: u32) -> BusAction {
        BusAction::Continue
    }
    fn mmio_read(&mut self, _addr: u64, size: u8) -> u64 {
        if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        }
    }
    fn mmio_write(&mut self, _addr: u64, _size: u8, _value: u64) -> BusAction {
        BusAction::Continue
    }
}
