//! Fuzz smoke test: random bytes as code in every mode (real mode, 16- and
//! 32-bit protected mode at CPL 0 and 3, with paging on and off, and
//! virtual-8086 mode). Exceptions land in handlers that skip a byte and
//! IRET (or stop at the monitor's exception bitmap, which then skips the
//! byte). Every run is bounded; the test asserts no panic and that no run
//! retires more than its budget.
//!
//! `POPEK_FUZZ_CASES` scales the number of cases (default 3000).

mod common;
use std::sync::atomic::{AtomicU64, Ordering};

use common::sys::*;
use iced_x86::code_asm::*;
use popek_cpu::state::{flags, seg as sr};
use popek_cpu::{CpuState, RunExit, Segment};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CODE16: u16 = (FREE as u16) << 3; // 0x48: 16-bit ring-0 code
const UCODE16: u16 = CODE16 + 8 + 3; // 0x53: 16-bit ring-3 code
const BUDGET: u64 = 2000;
/// Where real-mode and V86 code runs (0x2000:0).
const RM_CODE: u64 = 0x2_0000;

/// IDT stubs that skip one byte of the faulting code and return.
fn skipping_stubs(s: &Sys) {
    for v in 0..=255u8 {
        let at = STUBS + v as u64 * 16;
        let code = asm(32, at, |a| {
            if has_err(v) {
                a.add(esp, 4u32)?;
            }
            a.inc(dword_ptr(esp))?;
            a.iretd()
        });
        s.ram().write(at, &code).unwrap();
    }
}

/// Real-mode IVT: every vector to a stub that skips one byte and IRETs.
fn real_ivt(s: &Sys) {
    let stub = asm(16, 0x500, |a| {
        a.push(bp)?;
        a.mov(bp, sp)?;
        a.inc(word_ptr(bp + 2))?;
        a.pop(bp)?;
        a.iret()
    });
    s.ram().write(0x500, &stub).unwrap();
    for v in 0..256u64 {
        s.ram().write_u32(v * 4, 0x0000_0500).unwrap();
    }
}

static INSNS: AtomicU64 = AtomicU64::new(0);
static RUNS: AtomicU64 = AtomicU64::new(0);

fn one_case(mode: u8, code: &[u8], regs: [u32; 8], intercept: bool) {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xffff, 0x9a, 0));
    s.gdt(FREE + 1, desc(0, 0xffff, 0xfa, 0));
    skipping_stubs(&s);
    let paging = matches!(mode, 3 | 4);
    if paging {
        s.paging(P | W | U);
    }
    match mode {
        0 | 7 => s.ram().write(RM_CODE, code).unwrap(),
        5 | 6 => s.ram().write(0x8000, code).unwrap(),
        _ => {}
    }
    match mode {
        0 => {
            real_ivt(&s);
            let mut st = CpuState::reset();
            for i in 0..6 {
                st.seg[i] = Segment::real(0);
            }
            st.seg[sr::CS] = Segment::real((RM_CODE >> 4) as u16);
            st.rip = 0;
            st.gpr[4] = 0x7000;
            s.c.set_state(st);
        }
        1 | 3 => s.start_kernel(code),
        2 | 4 => s.start_user(code),
        5 => s.start_at(CODE16, KDATA, 0x8000, KSTACK, code),
        6 => s.start_at(UCODE16, UDATA, 0x8000, USTACK, code),
        _ => {
            // V86 at 0x2000:0 with a random IOPL.
            s.start_kernel(&[]);
            let st = s.c.state_mut();
            st.rflags = (flags::VM | flags::FIXED1 | ((regs[0] & 3) << 12)) as u64;
            for i in 0..6 {
                st.seg[i] = Segment::real(0x0900);
                st.seg[i].attr |= 3 << 5;
            }
            st.seg[sr::CS] = Segment::real((RM_CODE >> 4) as u16);
            st.seg[sr::CS].attr |= 3 << 5 | 8;
            st.rip = 0;
            st.gpr[4] = 0x0ff0;
        }
    }
    {
        let st = s.c.state_mut();
        for (i, r) in regs.iter().enumerate() {
            if i != 4 {
                st.gpr[i] = *r as u64;
            }
        }
    }
    if intercept {
        s.c.exception_bitmap = u32::MAX;
    }
    let mut total = 0;
    for _ in 0..8 {
        let before = s.c.icount;
        let x = s.c.run(&mut s.bus, BUDGET);
        let ran = s.c.icount - before;
        assert!(ran <= BUDGET, "a run retired {ran} > {BUDGET} instructions");
        total += ran;
        RUNS.fetch_add(1, Ordering::Relaxed);
        match x {
            RunExit::Exception { software, .. } => {
                if !software {
                    let st = s.c.state_mut();
                    st.rip = st.rip.wrapping_add(1) & 0xffff_ffff;
                }
            }
            RunExit::BusStop | RunExit::Hypercall => {}
            RunExit::Budget | RunExit::Halted | RunExit::Shutdown => break,
        }
    }
    INSNS.fetch_add(total, Ordering::Relaxed);
}

#[test]
fn random_code_in_every_mode_never_panics_or_hangs() {
    let cases = std::env::var("POPEK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000u32);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        0u8..8,
        proptest::collection::vec(any::<u8>(), 1..192),
        any::<[u32; 8]>(),
        any::<bool>(),
    );
    let start = std::time::Instant::now();
    runner
        .run(&strategy, |(mode, code, regs, intercept)| {
            one_case(mode, &code, regs, intercept);
            Ok(())
        })
        .unwrap();
    let n = INSNS.load(Ordering::Relaxed);
    println!(
        "fuzz: {cases} cases, {} runs, {n} instructions fuzzed in {:.1} s",
        RUNS.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    assert!(n > cases as u64, "the fuzzer executed almost nothing");
}

#[test]
fn every_two_byte_opcode_in_every_mode() {
    // Exhaustive over the first two bytes (with a fixed tail), CPL 3 and
    // CPL 0, 16- and 32-bit: catches panics in rarely used decode paths.
    let tail = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11, 0x22, 0x33, 0x44, 0x55,
    ];
    let mut count = 0u64;
    for mode in [1u8, 2, 5, 6] {
        for b0 in 0..=255u8 {
            let mut code = vec![b0, 0];
            code.extend_from_slice(&tail);
            for b1 in (0..=255u8).step_by(if b0 == 0x0f { 1 } else { 37 }) {
                code[1] = b1;
                one_case(
                    mode,
                    &code,
                    [0x1000, 2, 3, 0x2000, 0, 0x3000, 0x10, 0x20],
                    true,
                );
                count += 1;
            }
        }
    }
    println!("fuzz: {count} two-byte opcode cases");
}
