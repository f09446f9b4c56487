//! Guest instructions per second on a committed 32-bit guest loop: flat
//! segments, paging on (4 KiB pages), integer ALU, shifts, branches and
//! loads/stores (an xorshift mixed into a 16 KiB buffer with a running
//! checksum). Prints MIPS = instructions retired / seconds.
//!
//! `cargo bench -p popek-cpu --bench mips -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iced_x86::code_asm::*;
use popek_cpu::state::cr;
use popek_cpu::{Cpu, CpuState, NullBus, RunExit};
use popek_memory::GuestRam;

const CODE: u64 = 0x10_0000;
const BUF: u32 = 0x20_0000;
const PD: u64 = 0x1000;
const PT: u64 = 0x2000;
/// Instructions per measured run.
const SLICE: u64 = 1_000_000;

/// The guest loop. Never ends (the budget stops it).
fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut outer = a.create_label();
    let mut inner = a.create_label();
    a.mov(eax, 0x2545_f491u32).unwrap();
    a.xor(edx, edx).unwrap();
    a.mov(esi, BUF).unwrap();
    a.set_label(&mut outer).unwrap();
    a.mov(ecx, 4096u32).unwrap();
    a.set_label(&mut inner).unwrap();
    // xorshift32
    a.mov(ebx, eax).unwrap();
    a.shl(ebx, 13).unwrap();
    a.xor(eax, ebx).unwrap();
    a.mov(ebx, eax).unwrap();
    a.shr(ebx, 17).unwrap();
    a.xor(eax, ebx).unwrap();
    a.mov(ebx, eax).unwrap();
    a.shl(ebx, 5).unwrap();
    a.xor(eax, ebx).unwrap();
    // mix into the buffer and checksum it
    a.xor(dword_ptr(esi + ecx * 4 - 4), eax).unwrap();
    a.add(edx, dword_ptr(esi + ecx * 4 - 4)).unwrap();
    a.cmp(edx, eax).unwrap();
    let mut skip = a.create_label();
    a.jb(skip).unwrap();
    a.inc(edi).unwrap();
    a.set_label(&mut skip).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(inner).unwrap();
    a.jmp(outer).unwrap();
    a.assemble(CODE).unwrap()
}

fn machine() -> Cpu {
    let ram = Arc::new(GuestRam::new(8 << 20).unwrap());
    // Identity-map 0..4 MiB with 4 KiB pages.
    ram.write_u32(PD, PT as u32 | 7).unwrap();
    for i in 0..1024u64 {
        ram.write_u32(PT + 4 * i, (i << 12) as u32 | 7).unwrap();
    }
    ram.write(CODE, &guest()).unwrap();
    let mut c = Cpu::new(ram);
    let mut s = CpuState::flat_protected(0x08, 0x10);
    s.cr3 = PD;
    s.cr0 |= cr::CR0_PG | cr::CR0_WP;
    s.rip = CODE;
    s.gpr[4] = 0x8000;
    c.set_state(s);
    c
}

fn mips(c: &mut Criterion) {
    let mut cpu = machine();
    let mut bus = NullBus;
    let mut g = c.benchmark_group("interp");
    g.throughput(Throughput::Elements(SLICE));
    let mut insns = 0u64;
    let mut time = Duration::ZERO;
    g.bench_function("xorshift_loop_paged", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for _ in 0..iters {
                let before = cpu.icount;
                let x = cpu.run(&mut bus, SLICE);
                assert_eq!(x, RunExit::Budget);
                insns += cpu.icount - before;
            }
            let dt = t0.elapsed();
            time += dt;
            dt
        })
    });
    g.finish();
    println!(
        "MIPS: {:.1} ({} guest instructions in {:.2} s; {} blocks decoded, {} code invalidations)",
        insns as f64 / time.as_secs_f64() / 1e6,
        insns,
        time.as_secs_f64(),
        cpu.stats.blocks_decoded,
        cpu.stats.invalidations,
    );
}

criterion_group!(benches, mips);
criterion_main!(benches);
