//! Shared helpers for the CPU's directed tests: a RAM-backed machine with a
//! recording bus and iced-x86's assembler.
#![allow(dead_code)]

pub mod sys;

use std::sync::Arc;

use iced_x86::code_asm::CodeAssembler;
use popek_cpu::{Bus, BusAction, Cpu, CpuState, RunExit, SensitiveEvent};
use popek_memory::GuestRam;

/// A bus that records port writes and sensitive events.
#[derive(Default)]
pub struct TestBus {
    pub outs: Vec<(u16, u8, u32)>,
    pub events: Vec<SensitiveEvent>,
    pub irq: Option<u8>,
    pub stop_port: Option<u16>,
    /// When set, the platform clock RDTSC counts from.
    pub tsc: Option<u64>,
    /// MMIO writes seen; `mmio_stop` makes each one ask the CPU to stop.
    pub mmio_writes: Vec<(u64, u8, u64)>,
    pub mmio_stop: bool,
}

impl Bus for TestBus {
    fn io_in(&mut self, port: u16, _size: u8) -> u32 {
        port as u32 ^ 0x5a5a
    }
    fn io_out(&mut self, port: u16, size: u8, value: u32) -> BusAction {
        self.outs.push((port, size, value));
        if Some(port) == self.stop_port {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
    fn mmio_read(&mut self, _addr: u64, _size: u8) -> u64 {
        0xffff_ffff_ffff_ffff
    }
    fn mmio_write(&mut self, addr: u64, size: u8, value: u64) -> BusAction {
        self.mmio_writes.push((addr, size, value));
        if self.mmio_stop {
            BusAction::Stop
        } else {
            BusAction::Continue
        }
    }
    fn interrupt_pending(&mut self) -> bool {
        self.irq.is_some()
    }
    fn acknowledge_interrupt(&mut self) -> u8 {
        self.irq.take().unwrap_or(0xff)
    }
    fn clock(&mut self, instructions: u64) -> u64 {
        self.tsc.unwrap_or(instructions)
    }
    fn sensitive(&mut self, e: &SensitiveEvent) {
        self.events.push(e.clone());
    }
}

/// A CPU with `mb` MiB of RAM.
pub fn cpu(mb: u64) -> Cpu {
    Cpu::new(Arc::new(GuestRam::new(mb << 20).unwrap()))
}

/// Assembles 32-bit code for address `ip`.
pub fn asm32(ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// Assembles 16-bit code for address `ip`.
pub fn asm16(ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// Loads `code` at `addr` and starts the CPU there in flat 32-bit
/// protected mode (ring 0, paging off) with ESP = 0x8000.
pub fn start_flat(c: &mut Cpu, addr: u64, code: &[u8]) {
    c.ram().write(addr, code).unwrap();
    let mut s = CpuState::flat_protected(0x08, 0x10);
    s.rip = addr;
    s.gpr[4] = 0x8000;
    c.set_state(s);
}

/// Runs until HLT or a bounded number of instructions.
pub fn run_to_hlt(c: &mut Cpu, bus: &mut TestBus) -> RunExit {
    c.run(bus, 1_000_000)
}
