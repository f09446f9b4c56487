//! The `interp` engine: full-system emulation on popek's software CPU.
//!
//! The guest kernel runs at ring 0 of the software CPU, exactly as on a
//! physical PC; nothing is deprivileged or translated. Port I/O and MMIO go
//! straight to the machine's devices through [`MachineBus`]; only HLT,
//! shutdown, hypercalls and device stop requests come back to the VMM.

use popek_cpu::{Cpu, CpuState};
use popek_engine::bus::{vm_exit, MachineBus};
use popek_engine::factory::software_cpu_can_run;
use popek_engine::hypercall::HYPERCALL_PORT;
use popek_engine::{Engine, EngineError, EngineFactory, GuestMode, Inspect, VmExit};
use popek_machine::Machine;

/// What the VMM knows of `interp` before it builds one.
pub struct InterpFactory;

/// The `interp` engine's factory, for the VMM's list.
pub static FACTORY: InterpFactory = InterpFactory;

impl EngineFactory for InterpFactory {
    fn name(&self) -> &'static str {
        "interp"
    }
    fn describe(&self) -> String {
        "interp, the reference software CPU, runs every 32-bit guest".into()
    }
    fn available(&self) -> Result<(), String> {
        Ok(())
    }
    fn can_run(&self, mode: GuestMode) -> Result<(), String> {
        software_cpu_can_run(mode)
    }
    fn auto_rank(&self) -> Option<u8> {
        Some(2)
    }
    fn create(&self, machine: &Machine) -> Result<Box<dyn Engine>, EngineError> {
        Ok(Box::new(Interp::new(machine)))
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

impl Engine for Interp {
    fn name(&self) -> &'static str {
        "interp"
    }

    fn run(&mut self, machine: &mut Machine, budget: u64) -> Result<VmExit, EngineError> {
        let mut bus = MachineBus::new(machine);
        let exit = self.cpu.run(&mut bus, budget);
        Ok(vm_exit(exit))
    }

    fn share_code(&mut self, map: std::sync::Arc<popek_cpu::CodeMap>, index: usize) -> bool {
        self.cpu.share_code_map(map, index);
        true
    }

    fn run_on(
        &mut self,
        bus: &mut dyn popek_cpu::Bus,
        budget: u64,
    ) -> Option<Result<VmExit, EngineError>> {
        self.cpu.set_running(true);
        let exit = self.cpu.run(bus, budget);
        self.cpu.set_running(false);
        Some(Ok(vm_exit(exit)))
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

    fn set_instructions(&mut self, n: u64) {
        self.cpu.icount = n;
    }

    fn peek_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
        self.cpu.peek_linear(addr, buf)
    }

    fn poke_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
        self.cpu.poke_linear(addr, data)
    }

    fn inspect(&mut self) -> Option<&mut dyn Inspect> {
        Some(self)
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

impl Inspect for Interp {
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
