//! Software CPUs on several host threads sharing guest RAM and a code map
//! (`popek_cpu::coherence`): LOCKed instructions are atomic, and code one
//! CPU rewrites reaches another after it serializes.

mod common;

use std::sync::Arc;

use common::asm32;
use iced_x86::code_asm::*;
use popek_cpu::{CodeMap, Cpu, CpuState, NullBus, RunExit};
use popek_memory::GuestRam;

const CODE: u64 = 0x1000;
const DATA: u32 = 0x8000;

/// Runs CPU `index` of `n` from `entry` (EAX = index) until HLT.
fn run(ram: Arc<GuestRam>, map: Arc<CodeMap>, index: usize, entry: u64) {
    let mut cpu = Cpu::new(ram);
    cpu.share_code_map(map, index);
    let mut s = CpuState::flat_protected(0x08, 0x10);
    s.rip = entry;
    s.gpr[0] = index as u64;
    cpu.set_state(s);
    cpu.set_running(true);
    let mut bus = NullBus;
    let mut slices = 0;
    loop {
        match cpu.run(&mut bus, 10_000) {
            RunExit::Halted => break,
            RunExit::Budget => {}
            x => panic!("CPU {index}: {x:?} at {:#x}", cpu.state().rip),
        }
        slices += 1;
        assert!(slices < 100_000, "CPU {index} never halted");
    }
    cpu.set_running(false);
}

fn run_all(ram: &Arc<GuestRam>, cpus: usize, entry: u64) {
    let map = Arc::new(CodeMap::new(ram.size(), cpus));
    let ts: Vec<_> = (0..cpus)
        .map(|i| {
            let (ram, map) = (ram.clone(), map.clone());
            std::thread::spawn(move || run(ram, map, i, entry))
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
}

#[test]
fn locked_read_modify_writes_lose_no_update_across_threads() {
    const N: u32 = 100_000;
    let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
    let code = asm32(CODE, |a| {
        let mut top = a.create_label();
        let mut acquire = a.create_label();
        let mut bts_retry = a.create_label();
        let mut cas_retry = a.create_label();
        a.mov(ecx, N).unwrap();
        a.set_label(&mut top).unwrap();
        // LOCK XADD, LOCK INC, LOCK ADD on one word each.
        a.mov(eax, 1).unwrap();
        a.lock().xadd(dword_ptr(DATA), eax).unwrap();
        a.lock().inc(dword_ptr(DATA + 4)).unwrap();
        a.lock().add(word_ptr(DATA + 10), 1).unwrap();
        // A CMPXCHG loop.
        a.set_label(&mut cas_retry).unwrap();
        a.mov(eax, dword_ptr(DATA + 12)).unwrap();
        a.lea(edx, eax + 1).unwrap();
        a.lock().cmpxchg(dword_ptr(DATA + 12), edx).unwrap();
        a.jne(cas_retry).unwrap();
        // An XCHG spinlock around a plain increment.
        a.set_label(&mut acquire).unwrap();
        a.mov(eax, 1).unwrap();
        a.xchg(dword_ptr(DATA + 16), eax).unwrap();
        a.test(eax, eax).unwrap();
        a.jnz(acquire).unwrap();
        a.inc(dword_ptr(DATA + 20)).unwrap();
        a.mov(dword_ptr(DATA + 16), 0).unwrap();
        // A LOCK BTS bit lock around another (register bit offset 32 + 3:
        // the next dword).
        a.set_label(&mut bts_retry).unwrap();
        a.mov(edx, 35).unwrap();
        a.lock().bts(dword_ptr(DATA + 24), edx).unwrap();
        a.jc(bts_retry).unwrap();
        a.inc(dword_ptr(DATA + 32)).unwrap();
        a.lock().btr(dword_ptr(DATA + 24), edx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    ram.write(CODE, &code).unwrap();
    run_all(&ram, 2, CODE);
    let word = |o: u32| ram.read_u32((DATA + o) as u64).unwrap();
    assert_eq!(word(0), 2 * N, "lock xadd");
    assert_eq!(word(4), 2 * N, "lock inc");
    assert_eq!(
        ram.read_u16((DATA + 10) as u64).unwrap() as u32,
        2 * N % 65536,
        "lock add"
    );
    assert_eq!(word(12), 2 * N, "lock cmpxchg");
    assert_eq!(word(20), 2 * N, "xchg spinlock");
    assert_eq!(word(32), 2 * N, "lock bts bit lock");
    assert_eq!(word(28), 0, "bit lock released");
}

#[test]
fn code_rewritten_by_one_thread_runs_rewritten_on_another() {
    // CPU 1 calls F (which returns 1), tells CPU 0, waits for CPU 0 to
    // rewrite F to return 2 and raise a flag, serializes (CPUID) and calls
    // F again. Both calls' results land in memory.
    const F: u32 = 0x3000;
    let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
    let f = asm32(F as u64, |a| {
        a.mov(eax, 1).unwrap();
        a.ret().unwrap();
    });
    ram.write(F as u64, &f).unwrap();
    let code = asm32(CODE, |a| {
        let mut cpu1 = a.create_label();
        let mut wait_called = a.create_label();
        let mut wait_patched = a.create_label();
        a.mov(esp, 0x7000).unwrap();
        a.test(eax, eax).unwrap();
        a.jnz(cpu1).unwrap();
        // CPU 0: wait until F ran once, patch its immediate, raise the flag.
        a.set_label(&mut wait_called).unwrap();
        a.pause().unwrap();
        a.cmp(dword_ptr(DATA), 0).unwrap();
        a.je(wait_called).unwrap();
        a.mov(dword_ptr(F + 1), 2).unwrap();
        a.mov(dword_ptr(DATA + 4), 1).unwrap();
        a.hlt().unwrap();
        // CPU 1.
        a.set_label(&mut cpu1).unwrap();
        a.mov(esp, 0x6000).unwrap();
        a.mov(eax, F).unwrap();
        a.call(eax).unwrap();
        a.mov(dword_ptr(DATA + 8), eax).unwrap();
        a.mov(dword_ptr(DATA), 1).unwrap();
        a.set_label(&mut wait_patched).unwrap();
        a.pause().unwrap();
        a.cmp(dword_ptr(DATA + 4), 0).unwrap();
        a.je(wait_patched).unwrap();
        a.cpuid().unwrap();
        a.mov(eax, F).unwrap();
        a.call(eax).unwrap();
        a.mov(dword_ptr(DATA + 12), eax).unwrap();
        a.hlt().unwrap();
    });
    ram.write(CODE, &code).unwrap();
    run_all(&ram, 2, CODE);
    assert_eq!(ram.read_u32((DATA + 8) as u64).unwrap(), 1, "before");
    assert_eq!(
        ram.read_u32((DATA + 12) as u64).unwrap(),
        2,
        "after the rewrite"
    );
}
