//! The software engines' view of the machine: the [`Bus`] the software
//! CPU runs against, and the mapping of its run exits to [`VmExit`]s.
//!
//! `interp`, `bt` and `trap` all run [`popek_cpu::Cpu`] against the same
//! devices; only two things differ, and they are options here rather than
//! copies: whether the CPU takes external interrupts itself (`trap`'s
//! monitor delivers them) and which guest-physical addresses below the
//! MMIO window hold nothing (`trap` runs the CPU on host-physical pages,
//! some of which stand for memory beyond guest RAM).

use popek_cpu::{Bus, BusAction, RunExit, SensitiveEvent};
use popek_machine::Machine;

use crate::VmExit;

/// Adapts the machine to the software CPU's view of the outside world.
pub struct MachineBus<'a> {
    machine: &'a mut Machine,
    /// Sensitive-instruction events, when the CPU reports them.
    pub events: Option<&'a mut Vec<SensitiveEvent>>,
    /// MMIO below this address reads all-ones and drops writes.
    void_below: u64,
    /// The CPU polls the machine's interrupt line.
    interrupts: bool,
}

impl<'a> MachineBus<'a> {
    /// Wraps a machine: devices as they are, interrupts taken by the CPU.
    pub fn new(machine: &'a mut Machine) -> Self {
        MachineBus {
            machine,
            events: None,
            void_below: 0,
            interrupts: true,
        }
    }

    /// Records sensitive-instruction events in `events`.
    pub fn with_events(mut self, events: &'a mut Vec<SensitiveEvent>) -> Self {
        self.events = Some(events);
        self
    }

    /// MMIO accesses below `addr` reach nothing (reads all-ones, writes
    /// dropped), as on a bus with no device there.
    pub fn void_below(mut self, addr: u64) -> Self {
        self.void_below = addr;
        self
    }

    /// The CPU does not see the interrupt line: whoever runs it delivers
    /// interrupts itself.
    pub fn without_interrupts(mut self) -> Self {
        self.interrupts = false;
        self
    }

    fn after_write(&self) -> BusAction {
        if self.machine.stop_pending() {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
}

impl Bus for MachineBus<'_> {
    #[inline]
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        self.machine.io_in(port, size)
    }
    #[inline]
    fn io_out(&mut self, port: u16, size: u8, value: u32) -> BusAction {
        self.machine.io_out(port, size, value);
        self.after_write()
    }
    fn mmio_read(&mut self, addr: u64, size: u8) -> u64 {
        if addr < self.void_below {
            return u64::MAX;
        }
        self.machine.mmio_read(addr, size)
    }
    fn mmio_write(&mut self, addr: u64, size: u8, value: u64) -> BusAction {
        if addr >= self.void_below {
            self.machine.mmio_write(addr, size, value);
        }
        self.after_write()
    }
    #[inline]
    fn interrupt_pending(&mut self) -> bool {
        self.interrupts && self.machine.interrupt_pending()
    }
    fn acknowledge_interrupt(&mut self) -> u8 {
        self.machine.acknowledge_interrupt()
    }
    #[inline]
    fn nmi_pending(&mut self) -> bool {
        self.interrupts && self.machine.nmi_pending()
    }
    fn acknowledge_nmi(&mut self) {
        self.machine.acknowledge_nmi();
    }
    fn clock(&mut self, instructions: u64) -> u64 {
        self.machine.tsc(instructions)
    }
    fn device_time(&mut self, instructions: u64) {
        self.machine.device_time(instructions);
    }
    fn msr_read(&mut self, msr: u32) -> Option<Option<u64>> {
        self.machine
            .read_msr(self.machine.current_cpu(), msr)
            .map(Result::ok)
    }
    fn msr_write(&mut self, msr: u32, value: u64) -> Option<bool> {
        self.machine
            .write_msr(self.machine.current_cpu(), msr, value)
            .map(|r| r.is_ok())
    }
    fn pause(&mut self) -> BusAction {
        // Several vCPUs take turns on this thread: a spinning one yields.
        if self.machine.cpus() > 1 {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
    fn sensitive(&mut self, event: &SensitiveEvent) {
        if let Some(ev) = self.events.as_mut() {
            ev.push(event.clone());
        }
    }
}

/// Maps a software CPU's run exit to a VM exit (an exception reaching the
/// VMM means the engine did not intercept what it asked for: a shutdown).
pub fn vm_exit(exit: RunExit) -> VmExit {
    match exit {
        RunExit::Budget => VmExit::Budget,
        RunExit::Halted => VmExit::Halt,
        RunExit::Shutdown => VmExit::Shutdown {
            reason: "triple fault".into(),
        },
        RunExit::Hypercall => VmExit::Hypercall,
        RunExit::BusStop => VmExit::MachineStop,
        RunExit::Exception { vector, .. } => VmExit::Shutdown {
            reason: format!("unexpected intercepted exception {vector}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use popek_machine::MachineConfig;
    use popek_memory::GuestRam;
    use std::sync::Arc;

    fn machine() -> Machine {
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        Machine::new(MachineConfig::default(), ram, Box::new(std::io::sink())).unwrap()
    }

    #[test]
    fn the_void_reads_all_ones_and_drops_writes() {
        let mut m = machine();
        let mut bus = MachineBus::new(&mut m).void_below(0x10_0000);
        assert_eq!(bus.mmio_read(0x8000, 4), u64::MAX);
        assert_eq!(bus.mmio_write(0x8000, 4, 1), BusAction::Continue);
    }

    #[test]
    fn without_interrupts_the_line_is_never_seen() {
        let mut m = machine();
        let bus = MachineBus::new(&mut m).without_interrupts();
        assert!(!bus.interrupts);
    }
}
