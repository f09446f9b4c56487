//! The software engines' view of the machine: the [`Bus`] the software
//! CPU runs against, and the mapping of its run exits to [`VmExit`]s.
//!
//! `interp`, `bt` and `trap` all run [`popek_cpu::Cpu`] against the same
//! devices; only two things differ, and they are options here rather than
//! copies: whether the CPU takes external interrupts itself (`trap`'s
//! monitor delivers them) and which guest-physical addresses below the
//! MMIO window hold nothing (`trap` runs the CPU on host-physical pages,
//! some of which stand for memory beyond guest RAM).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::Instant;

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

/// The machine as the vCPUs on their own host threads share it: each
/// device access takes the lock; the interrupt lines are read without it.
pub struct SharedMachine<'m> {
    machine: Mutex<&'m mut Machine>,
    /// Each vCPU's input lines (`popek_machine::LINE_*`), kept current by
    /// every access that may change them ([`Machine::publish_lines`]).
    pub lines: Box<[AtomicU8]>,
    /// Each vCPU's host thread, to wake it when its lines rise.
    threads: Box<[OnceLock<Thread>]>,
    /// Each vCPU engine's way back from the guest, where it blocks there.
    kickers: Box<[Mutex<Option<crate::Kicker>>]>,
    /// Machine time's host origin ([`Machine::host_clock_origin`]): RDTSC
    /// needs no lock.
    origin: Option<(Instant, u64)>,
    /// Rung by device workers: unparks the vCPU threads.
    doorbell: std::sync::Arc<popek_machine::pci_device::Doorbell>,
}

impl<'m> SharedMachine<'m> {
    /// Shares `machine` between its vCPUs' threads.
    pub fn new(machine: &'m mut Machine) -> SharedMachine<'m> {
        let n = machine.cpus();
        let origin = machine.host_clock_origin();
        let doorbell = machine.doorbell().clone();
        let s = SharedMachine {
            doorbell,
            origin,
            machine: Mutex::new(machine),
            lines: (0..n).map(|_| AtomicU8::new(0)).collect(),
            threads: (0..n).map(|_| OnceLock::new()).collect(),
            kickers: (0..n).map(|_| Mutex::new(None)).collect(),
        };
        s.with(|_| ());
        s
    }

    /// The calling thread runs vCPU `cpu` (it is unparked when its lines
    /// rise).
    pub fn register(&self, cpu: usize) {
        let _ = self.threads[cpu].set(std::thread::current());
        self.doorbell.watch(cpu);
    }

    /// Runs `f` on the machine under its lock, then publishes the lines
    /// and wakes the vCPUs whose lines rose.
    pub fn with<R>(&self, f: impl FnOnce(&mut Machine) -> R) -> R {
        let mut g = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut g);
        let rose = g.publish_lines(&self.lines);
        drop(g);
        if rose != 0 {
            self.wake(rose);
        }
        r
    }

    /// vCPU `cpu`'s engine blocks in the guest and `kicker` brings it
    /// back (`None`: no longer; set it so before its thread ends).
    pub fn set_kicker(&self, cpu: usize, kicker: Option<crate::Kicker>) {
        *self.kickers[cpu].lock().unwrap_or_else(|e| e.into_inner()) = kicker;
    }

    /// Wakes the vCPUs in `mask`: unparks their threads and kicks their
    /// engines out of the guest.
    pub fn wake(&self, mask: u32) {
        for (i, t) in self.threads.iter().enumerate() {
            if mask & (1 << i) != 0 {
                if let Some(t) = t.get() {
                    t.unpark();
                }
                if let Some(k) = &*self.kickers[i].lock().unwrap_or_else(|e| e.into_inner()) {
                    k();
                }
            }
        }
    }

    /// vCPU `cpu`'s lines now.
    #[inline]
    pub fn lines(&self, cpu: usize) -> u8 {
        self.lines[cpu].load(Ordering::Relaxed)
    }

    /// The bus vCPU `cpu`'s engine runs against.
    pub fn bus(&self, cpu: usize) -> SharedBus<'_, 'm> {
        SharedBus {
            shared: self,
            cpu,
            pauses: 0,
        }
    }
}

/// One vCPU's view of a [`SharedMachine`]: the [`Bus`] of a software
/// engine on its own host thread.
pub struct SharedBus<'s, 'm> {
    shared: &'s SharedMachine<'m>,
    cpu: usize,
    /// PAUSEs executed (every few yields the host CPU).
    pauses: u32,
}

impl SharedBus<'_, '_> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Machine) -> R) -> R {
        let cpu = self.cpu;
        self.shared.with(|m| {
            m.set_current_cpu(cpu);
            f(m)
        })
    }

    fn after_write(&mut self) -> BusAction {
        if self.with(|m| m.stop_pending()) {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
}

impl Bus for SharedBus<'_, '_> {
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        self.with(|m| m.io_in(port, size))
    }
    fn io_out(&mut self, port: u16, size: u8, value: u32) -> BusAction {
        let stop = self.with(|m| {
            m.io_out(port, size, value);
            m.stop_pending()
        });
        if stop {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
    fn mmio_read(&mut self, addr: u64, size: u8) -> u64 {
        self.with(|m| m.mmio_read(addr, size))
    }
    fn mmio_write(&mut self, addr: u64, size: u8, value: u64) -> BusAction {
        self.with(|m| m.mmio_write(addr, size, value));
        self.after_write()
    }
    #[inline]
    fn interrupt_pending(&mut self) -> bool {
        self.shared.lines(self.cpu) & popek_machine::LINE_INTR != 0
    }
    fn acknowledge_interrupt(&mut self) -> u8 {
        self.with(|m| m.acknowledge_interrupt())
    }
    #[inline]
    fn nmi_pending(&mut self) -> bool {
        self.shared.lines(self.cpu) & popek_machine::LINE_NMI != 0
    }
    fn acknowledge_nmi(&mut self) {
        self.with(|m| m.acknowledge_nmi());
    }
    fn clock(&mut self, instructions: u64) -> u64 {
        match self.shared.origin {
            Some((start, ns)) => u64::try_from(start.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_add(ns),
            None => self.with(|m| m.tsc(instructions)),
        }
    }
    fn device_time(&mut self, _instructions: u64) {
        // Host clock only: machine time is the host's.
    }
    fn msr_read(&mut self, msr: u32) -> Option<Option<u64>> {
        let cpu = self.cpu;
        self.with(|m| m.read_msr(cpu, msr).map(Result::ok))
    }
    fn msr_write(&mut self, msr: u32, value: u64) -> Option<bool> {
        let cpu = self.cpu;
        self.with(|m| m.write_msr(cpu, msr, value).map(|r| r.is_ok()))
    }
    fn pause(&mut self) -> BusAction {
        // Pause-loop exiting in software: a vCPU spinning for another
        // (whose thread the host may have preempted: more vCPUs than host
        // CPUs) gives its host CPU away now and then.
        self.pauses = self.pauses.wrapping_add(1);
        if self.pauses % PAUSES_PER_YIELD == 0 {
            std::thread::yield_now();
        }
        BusAction::Continue
    }
}

/// PAUSEs a vCPU on its own thread executes per host `sched_yield`.
const PAUSES_PER_YIELD: u32 = 4;

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
    fn an_ipi_through_one_vcpus_bus_wakes_the_other_vcpus_thread() {
        let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
        let cfg = MachineConfig {
            cpus: 2,
            ..MachineConfig::default()
        };
        let mut m = Machine::new(cfg, ram, Box::new(std::io::sink())).unwrap();
        let shared = SharedMachine::new(&mut m);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                shared.register(1);
                let mut bus = shared.bus(1);
                // Software-enable its APIC, then sleep until the line rises.
                bus.mmio_write(0xfee0_00f0, 4, 0x1ff);
                let mut rounds = 0;
                while !bus.interrupt_pending() {
                    std::thread::park_timeout(std::time::Duration::from_secs(1));
                    rounds += 1;
                    assert!(rounds < 30, "never woken");
                }
                bus.acknowledge_interrupt()
            });
            let mut bus = shared.bus(0);
            bus.mmio_write(0xfee0_00f0, 4, 0x1ff);
            // A fixed IPI, vector 0x41, to APIC 1 (again until it took
            // one: the first may come before its APIC is enabled).
            while !waiter.is_finished() {
                bus.mmio_write(0xfee0_0310, 4, 1 << 24);
                bus.mmio_write(0xfee0_0300, 4, 0x4041);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(waiter.join().unwrap(), 0x41);
        });
    }

    #[test]
    fn without_interrupts_the_line_is_never_seen() {
        let mut m = machine();
        let bus = MachineBus::new(&mut m).without_interrupts();
        assert!(!bus.interrupts);
    }
}
