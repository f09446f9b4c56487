//! The `interp` engine: full-system emulation on popek's software CPU.
//!
//! The guest kernel runs at ring 0 of the software CPU, exactly as on a
//! physical PC; nothing is deprivileged or translated. Port I/O and MMIO go
//! straight to the machine's devices through [`MachineBus`]; only HLT,
//! shutdown, hypercalls and device stop requests come back to the VMM.

use popek_cpu::{Bus, BusAction, Cpu, CpuState, RunExit, SensitiveEvent};
use popek_engine::{Engine, EngineError, VmExit};
use popek_machine::Machine;

/// The port the hypercall doorbell listens on (`docs/hypercalls.md`).
pub const HYPERCALL_PORT: u16 = 0x5650;

/// Adapts the machine to the CPU's view of the outside world.
pub struct MachineBus<'a> {
    machine: &'a mut Machine,
    /// Sensitive-instruction events, when the CPU reports them.
    pub events: Option<&'a mut Vec<SensitiveEvent>>,
}

impl<'a> MachineBus<'a> {
    /// Wraps a machine.
    pub fn new(machine: &'a mut Machine) -> Self {
        MachineBus {
            machine,
            events: None,
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
        if self.machine.stop_pending() {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
    fn mmio_read(&mut self, addr: u64, size: u8) -> u64 {
        self.machine.mmio_read(addr, size)
    }
    fn mmio_write(&mut self, addr: u64, size: u8, value: u64) -> BusAction {
        self.machine.mmio_write(addr, size, value);
        if self.machine.stop_pending() {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
    #[inline]
    fn interrupt_pending(&mut self) -> bool {
        self.machine.interrupt_pending()
    }
    fn acknowledge_interrupt(&mut self) -> u8 {
        self.machine.acknowledge_interrupt()
    }
    fn clock(&mut self, instructions: u64) -> u64 {
        self.machine.tsc(instructions)
    }
    fn device_time(&mut self, instructions: u64) {
        self.machine.device_time(instructions);
    }
    fn sensitive(&mut self, event: &SensitiveEvent) {
        if let Some(ev) = self.events.as_mut() {
            ev.push(event.clone());
        }
    }
}

/// The `interp` engine.
pub struct Interp {
    cpu: Cpu,
}

impl Interp {
    /// An engine whose CPU uses the machine's RAM.
    pub fn new(machine: &Machine) -> Interp {
        let mut cpu = Cpu::new(machine.ram().clone());
        cpu.hypercall_port = Some(HYPERCALL_PORT);
        Interp { cpu }
    }

    /// The software CPU, for tests and tools.
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }
}

/// Maps a CPU run exit to a VM exit.
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

impl Engine for Interp {
    fn name(&self) -> &'static str {
        "interp"
    }

    fn run(&mut self, machine: &mut Machine, budget: u64) -> Result<VmExit, EngineError> {
        let mut bus = MachineBus::new(machine);
        let exit = self.cpu.run(&mut bus, budget);
        Ok(vm_exit(exit))
    }

    fn state(&mut self) -> CpuState {
        self.cpu.state().clone()
    }

    fn set_state(&mut self, state: CpuState) -> Result<(), EngineError> {
        if state.efer & (1 << 10) != 0 {
            return Err(EngineError::Unsupported {
                engine: "interp",
                reason: "long mode is not implemented by the software CPU yet".into(),
            });
        }
        self.cpu.set_state(state);
        Ok(())
    }

    fn instructions(&self) -> u64 {
        self.cpu.icount
    }

    fn peek_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
        self.cpu.peek_linear(addr, buf)
    }

    fn poke_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
        self.cpu.poke_linear(addr, data)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.cpu.stats;
        vec![
            ("instructions", self.cpu.icount),
            ("blocks decoded", s.blocks_decoded),
            ("code pages invalidated", s.invalidations),
            (
                "decoded-block cache, KiB",
                self.cpu.block_cache_bytes() as u64 >> 10,
            ),
            ("decoded-block cache flushes", s.block_cache_flushes),
            ("events delivered", s.deliveries),
        ]
    }
}
