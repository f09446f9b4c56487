//! Focused micro-benchmarks of the `bt` engine against the interpreter,
//! outside the VMM: a call/return loop (minios's `callret`) and, when a
//! minios ELF is given, its SHA-256 `block` function called in a loop (the
//! heart of `compute`).
//!
//!   cargo run --release -p popek-bt --example microbench [MINIOS_ELF] [ITERS]
//!
//! Guest: flat 32-bit protected mode, paging off, CPL 0; run in slices of
//! 200 000 instructions as the VMM does. Prints ns per iteration for `bt`
//! and `interp` and their ratio.

use std::sync::Arc;
use std::time::Instant;

use iced_x86::code_asm::*;
use popek_bt::BtCore;
use popek_cpu::{Bus, BusAction, Cpu, CpuState, RunExit};
use popek_memory::GuestRam;

struct Quiet;

impl Bus for Quiet {
    fn io_in(&mut self, _port: u16, _size: u8) -> u32 {
        0
    }
    fn io_out(&mut self, _port: u16, _size: u8, _value: u32) -> BusAction {
        BusAction::Continue
    }
    fn mmio_read(&mut self, _addr: u64, _size: u8) -> u64 {
        0
    }
    fn mmio_write(&mut self, _addr: u64, _size: u8, _value: u64) -> BusAction {
        BusAction::Continue
    }
    fn interrupt_pending(&mut self) -> bool {
        false
    }
    fn acknowledge_interrupt(&mut self) -> u8 {
        0
    }
    fn clock(&mut self, instructions: u64) -> u64 {
        instructions
    }
}

const RAM: u64 = 8 << 20;
const SLICE: u64 = 200_000;

/// Guest RAM (`MB_RAM_MB`, default 8).
fn ram_size() -> u64 {
    std::env::var("MB_RAM_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(RAM, |m| m << 20)
}

fn cpu(ram: &Arc<GuestRam>, eip: u64) -> Cpu {
    let mut cpu = Cpu::new(ram.clone());
    // MB_CPL3=1: user mode (the guest ends with a #GP at HLT).
    let user = std::env::var_os("MB_CPL3").is_some();
    let mut s = if user {
        CpuState::flat_protected(0x1b, 0x23)
    } else {
        CpuState::flat_protected(0x08, 0x10)
    };
    s.rip = eip;
    s.gpr[4] = std::env::var("MB_ESP")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x28_0000);
    s.rflags = 2;
    if std::env::var_os("MB_PAGING").is_some() {
        // Identity-map the first 8 MiB with 4 KiB pages (user, writable).
        let pd = 0x70_0000u64;
        for t in 0..2u64 {
            let pt = pd + 0x1000 * (t + 1);
            ram.write(pd + 4 * t, &((pt as u32) | 7).to_le_bytes())
                .unwrap();
            for i in 0..1024u64 {
                let pa = (t << 22) | (i << 12);
                ram.write(pt + 4 * i, &((pa as u32) | 7).to_le_bytes())
                    .unwrap();
            }
        }
        s.cr3 = pd;
        s.cr0 |= 0x8000_0000;
    }
    cpu.set_state(s);
    cpu.exception_bitmap = !0;
    cpu
}

/// Runs to HLT; returns (seconds, instructions).
fn time_bt(ram: &Arc<GuestRam>, eip: u64) -> (f64, u64) {
    let mut bt = BtCore::new(cpu(ram, eip)).unwrap();
    let t = Instant::now();
    let trace = std::env::var_os("MB_SLICES").is_some();
    loop {
        let t1 = Instant::now();
        let r = bt.run(&mut Quiet, SLICE);
        if trace {
            eprintln!("  slice {:?} icount {}", t1.elapsed(), bt.cpu().icount);
        }
        match r {
            RunExit::Budget => {}
            RunExit::Halted | RunExit::Exception { vector: 13, .. } => break,
            e => panic!("bt: {e:?} at {:#x}", bt.cpu().state().rip),
        }
    }
    let s = t.elapsed().as_secs_f64();
    if std::env::var_os("MB_STATS").is_some() {
        for (k, v) in bt.stats_list() {
            eprintln!("  {k:48} {v}");
        }
    }
    let mut st = vec![0u8; 0x40];
    ram.read(0x24_0000, &mut st).unwrap();
    if std::env::var_os("MB_STATE").is_some() {
        eprintln!(
            "  bt state {:02x?} regs {:x?}",
            &st[..32],
            &bt.cpu().state().gpr[..8]
        );
    }
    (s, bt.cpu().icount)
}

fn time_interp(ram: &Arc<GuestRam>, eip: u64) -> (f64, u64) {
    let mut c = cpu(ram, eip);
    let t = Instant::now();
    loop {
        match c.run(&mut Quiet, SLICE) {
            RunExit::Budget => {}
            RunExit::Halted | RunExit::Exception { vector: 13, .. } => break,
            e => panic!("interp: {e:?}"),
        }
    }
    let el = t.elapsed().as_secs_f64();
    let mut st = vec![0u8; 0x40];
    ram.read(0x24_0000, &mut st).unwrap();
    if std::env::var_os("MB_STATE").is_some() {
        eprintln!(
            "  in state {:02x?} regs {:x?}",
            &st[..32],
            &c.state().gpr[..8]
        );
    }
    (el, c.icount)
}

fn report(name: &str, iters: u64, build: &dyn Fn() -> (Arc<GuestRam>, u64)) {
    let (ram, eip) = build();
    let (mut tb, nb) = time_bt(&ram, eip);
    // MB_REPEAT=n: the best of n runs (each on a fresh engine and guest).
    let reps: u32 = std::env::var("MB_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 1..reps {
        let (ram, eip) = build();
        tb = tb.min(time_bt(&ram, eip).0);
    }
    if std::env::var_os("MB_BT_ONLY").is_some() {
        println!("{name:8} bt {:10.2} ns", tb * 1e9 / iters as f64);
        return;
    }
    let (ram, eip) = build();
    let (ti, ni) = time_interp(&ram, eip);
    assert_eq!(nb, ni, "instruction counts differ");
    let (b, i) = (tb * 1e9 / iters as f64, ti * 1e9 / iters as f64);
    println!(
        "{name:8} bt {b:10.2} ns  interp {i:10.2} ns  ratio {:5.2}  ({} insns/iter)",
        i / b,
        nb / iters
    );
}

fn callret(iters: u64) -> (Arc<GuestRam>, u64) {
    let ram = Arc::new(GuestRam::new(ram_size()).unwrap());
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    let mut leaf = a.create_label();
    a.mov(edx, iters as u32).unwrap();
    a.xor(eax, eax).unwrap();
    a.set_label(&mut top).unwrap();
    a.call(leaf).unwrap();
    a.dec(edx).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    for _ in 0..64 {
        a.nop().unwrap();
    }
    a.set_label(&mut leaf).unwrap();
    a.inc(eax).unwrap();
    a.ret().unwrap();
    let code = a.assemble(0x30_0000).unwrap();
    ram.write(0x30_0000, &code).unwrap();
    (ram, 0x30_0000)
}

fn block_loop(elf: &[u8], iters: u64) -> (Arc<GuestRam>, u64) {
    let ram = Arc::new(GuestRam::new(ram_size()).unwrap());
    // ELF32 program headers: PT_LOAD segments at their physical address.
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u32_at(28), u16_at(42), u16_at(44));
    for i in 0..phnum {
        let p = phoff + i * phentsize;
        if u32_at(p) != 1 {
            continue;
        }
        let (off, paddr, filesz) = (u32_at(p + 4), u32_at(p + 12), u32_at(p + 16));
        ram.write(paddr as u64, &elf[off..off + filesz]).unwrap();
    }
    // block(state = EAX, data = EDX), regparm: minios's sha256 `block`.
    let block = std::env::var("MB_BLOCK")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x1024a0);
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    a.mov(esi, iters as u32).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(eax, 0x24_0000).unwrap();
    a.mov(edx, 0x25_0000).unwrap();
    a.call(block).unwrap();
    a.dec(esi).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x20_0000).unwrap();
    ram.write(0x20_0000, &code).unwrap();
    (ram, 0x20_0000)
}

/// minios's own callret loop (prog_bench at 0x101896: `mov edx,N; xor
/// eax,eax; …; call leaf; dec edx; jne`), N patched, HLT after the loop.
fn minios_callret(elf: &[u8], iters: u64) -> (Arc<GuestRam>, u64) {
    let (ram, _) = block_loop(elf, 1);
    ram.write(0x10_1897, &(iters as u32).to_le_bytes()).unwrap();
    ram.write(0x10_18a8, &[0xf4]).unwrap();
    (ram, 0x10_1896)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let iters = 10_000_000 * n;
    report("callret", iters, &|| callret(iters));
    if let Some(path) = args.get(1) {
        let elf = std::fs::read(path).unwrap();
        let iters = 100_000 * n;
        report("block", iters, &|| block_loop(&elf, iters));
        if std::env::var_os("MB_MINIOS_CALLRET").is_some() {
            let iters = std::env::var("MB_ITERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000_000 * n);
            report("mcallret", iters, &|| minios_callret(&elf, iters));
        }
    }
}
