//! The `hw` engine on the host's KVM, with tiny guests assembled here.
//!
//! Each test needs `/dev/kvm`; without it, or when the probe says this KVM
//! cannot run the guest's CPU mode, the test says why on stderr and returns.
//! On `kvm_pvm` (our CI) the tests of what PVM cannot do check that popek
//! reports it clearly instead.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iced_x86::code_asm::*;
use popek_engine::{Engine, VmExit};
use popek_hw::guests::{self, TestGuest};
use popek_hw::probe::{self, Capabilities, GuestEnd};
use popek_hw::Hw;
use popek_machine::{ClockMode, Machine, MachineConfig, StopReason};
use popek_memory::GuestRam;

fn caps() -> Option<Capabilities> {
    if !popek_hw::kvm_available() {
        eprintln!("skipped: /dev/kvm is absent or cannot be opened");
        return None;
    }
    Some(probe::probe())
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Booted {
    hw: Hw,
    machine: Machine,
    ram: Arc<GuestRam>,
    console: Console,
}

fn boot(g: &TestGuest) -> Booted {
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let console = Console::default();
    let machine = Machine::new(
        MachineConfig {
            clock: ClockMode::Host,
            ..Default::default()
        },
        ram.clone(),
        Box::new(console.clone()),
    )
    .unwrap();
    g.load(&ram).unwrap();
    let mut hw = Hw::new(&machine).unwrap();
    hw.set_state(g.state.clone()).unwrap();
    Booted {
        hw,
        machine,
        ram,
        console,
    }
}

fn run(b: &mut Booted) -> GuestEnd {
    probe::run_until_end(&mut b.hw, &mut b.machine, Duration::from_secs(10))
}

/// `mov dx, 0x3f8; out dx, al` for each byte of `s`.
fn serial(a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
    a.mov(dx, 0x3f8u32)?;
    for c in s.bytes() {
        a.mov(al, c as u32)?;
        a.out(dx, al)?;
    }
    Ok(())
}

#[test]
fn real_mode_guest_writes_serial_and_debug_exit() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Real) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::real_mode(&|a| {
        serial(a, "real\n")?;
        // 16-bit arithmetic and a store through DS.
        a.mov(ax, 0x1234u32)?;
        a.add(ax, 0x1111u32)?;
        a.mov(word_ptr(0x600), ax)?;
        guests::debug_exit(a, 0x2a)
    });
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x2a));
    assert_eq!(b.console.text(), "real\n");
    let mut w = [0u8; 2];
    b.ram.read(0x600, &mut w).unwrap();
    assert_eq!(u16::from_le_bytes(w), 0x2345);
    // The OUT that stopped the machine is complete: RIP is past it.
    let s = b.hw.state();
    assert_eq!(s.cr0 & 1, 0, "still in real mode");
    assert_eq!(s.gpr[0] & 0xff, 0x2a);
    assert!(b.hw.hw_stats().io >= 6);
}

#[test]
fn unpaged_protected_mode_guest_runs() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Protected32) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::protected32(&|a| {
        serial(a, "pm32\n")?;
        // sum 1..=100 with a loop, stored at 0x600
        let mut top = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 100u32)?;
        a.set_label(&mut top)?;
        a.add(eax, ecx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(dword_ptr(0x600), eax)?;
        a.push(eax)?;
        a.pop(ebx)?;
        guests::debug_exit(a, 0x32)
    });
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x32));
    assert_eq!(b.console.text(), "pm32\n");
    assert_eq!(b.ram.read_u32(0x600).unwrap(), 5050);
    let s = b.hw.state();
    assert_eq!(s.gpr[3], 5050);
    assert_eq!(s.seg[1].selector, guests::CS32);
    assert_eq!(s.gpr[4], guests::STACK, "push/pop balanced on the stack");
}

#[test]
fn mmio_outside_ram_goes_to_the_machine() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Protected32) {
        eprintln!("skipped: {why}");
        return;
    }
    // The MMIO window at 0xc0000000 has no device: reads are all ones,
    // writes are ignored — through KVM_EXIT_MMIO to the machine's bus.
    let g = guests::protected32(&|a| {
        a.mov(dword_ptr(0xc000_0000u32), 0x1234u32)?;
        a.mov(eax, dword_ptr(0xc000_0010u32))?;
        a.mov(dword_ptr(0x600), eax)?;
        guests::debug_exit(a, 0x3d)
    });
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x3d));
    assert_eq!(b.ram.read_u32(0x600).unwrap(), 0xffff_ffff);
    assert_eq!(b.hw.hw_stats().mmio, 2);
}

#[test]
fn long_mode_guest_entered_directly() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::long64(&|a| {
        serial(a, "long\n")?;
        a.mov(r8, 0x1122_3344_5566_7788u64)?;
        a.mov(r15, r8)?;
        a.shl(r15, 4)?;
        a.mov(rdi, 0x600u64)?;
        a.mov(qword_ptr(rdi), r15)?;
        guests::debug_exit(a, 0x64)
    });
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x64));
    assert_eq!(b.console.text(), "long\n");
    let mut q = [0u8; 8];
    b.ram.read(0x600, &mut q).unwrap();
    assert_eq!(u64::from_le_bytes(q), 0x1223_3445_5667_7880);
    let s = b.hw.state();
    assert_eq!(s.gpr[15], 0x1223_3445_5667_7880);
    assert_eq!(s.efer & 0x500, 0x500);
    assert_eq!(s.code_bits(), 64);
}

#[test]
fn long_mode_entered_from_32bit_code() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::LongFrom32) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::long_from32(&|a| {
        serial(a, "switched\n")?;
        guests::debug_exit(a, 0x65)
    });
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x65));
    assert_eq!(b.console.text(), "switched\n");
    assert_eq!(b.hw.state().efer & 0x400, 0x400, "EFER.LMA");
}

#[test]
fn paged_32bit_guest_runs_or_is_refused_as_the_probe_says() {
    let Some(caps) = caps() else { return };
    let g = guests::paged32(&|a| guests::debug_exit(a, 0x33));
    let mut b = boot(&g);
    let end = run(&mut b);
    if caps.paging32.ok {
        assert_eq!(end, GuestEnd::DebugExit(0x33));
    } else {
        // kvm_pvm: MOV to CR0 with PG raises #GP; with no IDT, a triple
        // fault there, which the engine recognizes as "cannot run".
        match end {
            GuestEnd::Error(e) => {
                assert!(e.contains("cannot run this guest"), "{e}");
                assert!(e.contains("refuses 32-bit paging"), "{e}");
            }
            e => panic!("expected the engine to refuse 32-bit paging, got {e:?}"),
        }
        assert!(caps.can_run(probe::GuestMode::Paged32).is_err());
    }
}

#[test]
fn interrupts_from_the_pic_are_injected() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::ticking(3, &|_| Ok(()), &|_| Ok(()));
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x70));
    let mut q = [0u8; 8];
    b.ram.read(0x3000, &mut q).unwrap();
    assert_eq!(u64::from_le_bytes(q), 3);
    assert!(b.hw.hw_stats().interrupts >= 3, "{:?}", b.hw.hw_stats());
    assert!(b.hw.hw_stats().hlt >= 1);
}

#[test]
fn the_guest_tsc_runs_at_the_machine_rate_where_kvm_can_scale_it() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    // RDTSC around 20 PIT ticks of 1 ms: about 20 M cycles at 1 GHz.
    let store = |off: i32| {
        move |a: &mut CodeAssembler| -> Result<(), IcedError> {
            a.rdtsc()?;
            a.mov(rsi, 0x3100u64)?;
            a.mov(dword_ptr(rsi + off), eax)?;
            a.mov(dword_ptr(rsi + off + 4), edx)
        }
    };
    let (before, after) = (store(0), store(8));
    let g = guests::ticking(20, &before, &after);
    let mut b = boot(&g);
    let wall = std::time::Instant::now();
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x70));
    let wall_ns = wall.elapsed().as_nanos() as u64;
    if !caps.tsc_scaling.ok {
        eprintln!(
            "skipped: this KVM does not scale the guest TSC to 1 GHz ({})",
            caps.tsc_scaling.detail
        );
        return;
    }
    let mut q = [0u8; 16];
    b.ram.read(0x3100, &mut q).unwrap();
    let t0 = u64::from_le_bytes(q[..8].try_into().unwrap());
    let t1 = u64::from_le_bytes(q[8..].try_into().unwrap());
    let cycles = t1.wrapping_sub(t0);
    // At least 20 ms passed (the PIT cannot tick faster than real time),
    // and no more than the host time the whole run took: at 1 GHz, one
    // cycle per nanosecond. (An unscaled 2–4 GHz TSC fails the upper bound.)
    assert!(
        cycles >= 19_000_000 && cycles <= wall_ns + wall_ns / 10,
        "20 PIT ticks took {cycles} guest TSC cycles in {wall_ns} ns of host time (want 1 cycle per ns)"
    );
}

#[test]
fn triple_fault_is_a_shutdown_exit() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    // The IDT (base 0) holds no gates: UD2 → #NP → #DF → shutdown. (INT3
    // would not do: kvm_pvm fails to emulate it at CPL 0.)
    let g = guests::long64(&|a| {
        a.ud2()?;
        guests::debug_exit(a, 1)
    });
    let mut b = boot(&g);
    match run(&mut b) {
        GuestEnd::Shutdown(r) => assert!(r.contains("triple fault"), "{r}"),
        e => panic!("expected a triple fault, got {e:?}"),
    }
}

#[test]
fn emulation_failure_is_reported_with_registers_and_bytes() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    // kvm_pvm cannot emulate CMPXCHG16B at CPL 0; hardware VT runs it.
    let g = guests::long64(&|a| {
        a.mov(rbx, 0xfeed_f00du64)?;
        a.mov(rdi, 0x800u64)?;
        a.cmpxchg16b(xmmword_ptr(rdi))?;
        guests::debug_exit(a, 1)
    });
    let mut b = boot(&g);
    match run(&mut b) {
        GuestEnd::Error(r) => {
            assert!(r.contains("KVM_EXIT_INTERNAL_ERROR"), "{r}");
            assert!(r.contains("suberror 1 (emulation failure)"), "{r}");
            assert!(r.contains("RBX=00000000feedf00d"), "{r}");
            assert!(r.contains("RIP="), "{r}");
            assert!(r.contains("cmpxchg16b") && r.contains("48 0f c7 0f"), "{r}");
        }
        GuestEnd::DebugExit(1) => eprintln!(
            "skipped: this KVM ({}) runs CMPXCHG16B at CPL 0, so it shows no emulation failure",
            caps.kind_name()
        ),
        e => panic!("expected an emulation failure, got {e:?}"),
    }
}

#[test]
fn lar_and_lsl_run_even_where_kvm_cannot_emulate_them() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::long64(&|a| {
        a.mov(eax, u32::from(guests::CS64))?;
        a.lar(ecx, eax)?;
        a.mov(rdi, 0x900u64)?;
        a.mov(dword_ptr(rdi), ecx)?;
        a.mov(eax, u32::from(guests::DS))?;
        a.lsl(edx, eax)?;
        a.mov(dword_ptr(rdi + 4), edx)?;
        a.xor(eax, eax)?;
        a.lar(ecx, eax)?; // null selector: ZF = 0
        a.setz(al)?;
        a.mov(byte_ptr(rdi + 8), al)?;
        guests::debug_exit(a, 0x4c)
    });
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::DebugExit(0x4c));
    assert_eq!(b.ram.read_u32(0x900).unwrap(), 0x00a0_9b00);
    assert_eq!(b.ram.read_u32(0x904).unwrap(), 0xffff_ffff);
    let mut z = [9u8];
    b.ram.read(0x908, &mut z).unwrap();
    assert_eq!(z[0], 0);
    if caps.lar_cpl0.ok {
        assert_eq!(b.hw.hw_stats().emulated, 0);
    } else {
        assert_eq!(b.hw.hw_stats().emulated, 3, "popek finished LAR, LSL, LAR");
    }
}

#[test]
fn user_mode_events_follow_the_probe() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let sys = guests::user_mode(&|a| {
        a.syscall()?;
        a.hlt()
    });
    // 0x5c: LSTAR reached at CPL 0; 0x5d: reached but still at CPL 3
    // (kvm_pvm), which the probe reports.
    let want_sys = if caps.user_syscall.ok { 0x5c } else { 0x5d };
    assert_eq!(run(&mut boot(&sys)), GuestEnd::DebugExit(want_sys));
    let int80 = guests::user_mode(&|a| {
        a.int(0x80)?;
        a.hlt()
    });
    let want = if caps.user_int.ok { 0x80 } else { 6 };
    assert_eq!(run(&mut boot(&int80)), GuestEnd::DebugExit(want));
}

#[test]
fn halt_with_interrupts_disabled_comes_back_as_halt() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Real) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::real_mode(&|a| {
        a.cli()?;
        a.hlt()?;
        guests::debug_exit(a, 1)
    });
    let mut b = boot(&g);
    assert_eq!(run(&mut b), GuestEnd::Halted);
    // Halted stays halted: running again does not fall through the HLT.
    assert_eq!(b.hw.run(&mut b.machine, 1000).unwrap(), VmExit::Halt);
    assert!(b.hw.state().halted);
}

#[test]
fn a_spinning_guest_returns_at_the_end_of_its_slice() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::long64(&|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.jmp(top)
    });
    let mut b = boot(&g);
    let t = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(b.hw.run(&mut b.machine, 200_000).unwrap(), VmExit::Budget);
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(b.hw.instructions() > 0);
}

/// Serves hypercalls with the engine crate's `hypercall::serve` (what the VMM uses).
fn run_with_hypercalls(
    b: &mut Booted,
) -> (Option<StopReason>, popek_engine::hypercall::HypercallStats) {
    let mut stats = popek_engine::hypercall::HypercallStats::default();
    for _ in 0..1000 {
        match b.hw.run(&mut b.machine, 200_000).unwrap() {
            VmExit::Hypercall => {
                if let Some(r) =
                    popek_engine::hypercall::serve(&mut b.hw, &mut b.machine, &mut stats)
                {
                    return (Some(r), stats);
                }
            }
            VmExit::MachineStop => return (b.machine.take_stop(), stats),
            VmExit::Budget => {}
            other => {
                let st = b.hw.state();
                panic!("unexpected exit {other:?}\n{st}")
            }
        }
    }
    (None, stats)
}

#[test]
fn hypercall_doorbell_from_a_64bit_guest() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let msg = b"hello from a hypercall\n";
    let mut g = guests::long64(&|a| {
        let hc = |a: &mut CodeAssembler, nr: u32| -> Result<(), IcedError> {
            a.mov(eax, nr)?;
            a.mov(dx, 0x5650u32)?;
            a.in_(eax, dx)
        };
        a.mov(r12, 0x0bad_cafe_1234u64)?;
        hc(a, 0)?; // HC_VERSION
        a.mov(rdi, 0x600u64)?;
        a.mov(dword_ptr(rdi), eax)?;
        a.mov(ebx, 0x700u32)?;
        a.mov(ecx, msg.len() as u32)?;
        hc(a, 1)?; // HC_CONSOLE_WRITE
        a.mov(dword_ptr(rdi + 4), eax)?;
        hc(a, 99)?; // unknown: -ENOSYS
        a.mov(dword_ptr(rdi + 8), eax)?;
        a.mov(qword_ptr(rdi + 16), r12)?;
        a.mov(ebx, 0x21u32)?;
        hc(a, 2) // HC_EXIT(0x21)
    });
    g.memory.push((0x700, msg.to_vec()));
    let mut b = boot(&g);
    let (stop, stats) = run_with_hypercalls(&mut b);
    assert_eq!(stop, Some(StopReason::DebugExit(0x21)));
    assert_eq!(b.console.text(), String::from_utf8_lossy(msg));
    assert_eq!(b.ram.read_u32(0x600).unwrap(), 1, "HC_VERSION");
    assert_eq!(b.ram.read_u32(0x604).unwrap(), msg.len() as u32);
    assert_eq!(b.ram.read_u32(0x608).unwrap() as i32, -38, "ENOSYS");
    let mut q = [0u8; 8];
    b.ram.read(0x610, &mut q).unwrap();
    assert_eq!(
        u64::from_le_bytes(q),
        0x0bad_cafe_1234,
        "other registers kept"
    );
    assert_eq!(stats.calls[0], 1);
    assert_eq!(stats.calls[1], 1);
    assert_eq!(b.hw.hw_stats().hypercalls, 4);
}

#[test]
fn the_doorbell_is_no_hypercall_from_user_mode() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::user_mode(&|a| {
        a.mov(eax, 0u32)?; // HC_VERSION, were it a hypercall
        a.mov(dx, 0x5650u32)?;
        a.in_(eax, dx)?;
        a.mov(rdi, 0x900u64)?;
        a.mov(dword_ptr(rdi), eax)?;
        a.syscall()
    });
    let mut b = boot(&g);
    let end = run(&mut b);
    assert_eq!(b.hw.hw_stats().hypercalls, 0);
    match end {
        // IOPL 0, no I/O bitmap: #GP, as on hardware (and on kvm_pvm for
        // this port).
        GuestEnd::DebugExit(13) => {}
        // A KVM that lets the IN through (kvm_pvm does for some ports): an
        // ordinary read of an unassigned port.
        GuestEnd::DebugExit(0x5c) => {
            assert!(!caps.user_io_protection.ok);
            assert_eq!(b.ram.read_u32(0x900).unwrap(), 0xffff_ffff);
        }
        e => panic!("unexpected end {e:?}"),
    }
}

#[test]
fn state_round_trips_through_kvm() {
    let Some(caps) = caps() else { return };
    if let Err(why) = caps.can_run(probe::GuestMode::Long64) {
        eprintln!("skipped: {why}");
        return;
    }
    let g = guests::long64(&|a| guests::debug_exit(a, 1));
    let mut b = boot(&g);
    let mut s = b.hw.state();
    for (i, r) in s.gpr.iter_mut().enumerate() {
        *r = 0x0101_0101_0101_0101 * i as u64;
    }
    s.msr.lstar = 0xffff_ffff_8000_1000;
    s.msr.sysenter_eip = 0x1234;
    s.fpu.xmm[7] = 0xdead_beef_0000_0000_1111_2222_3333_4444;
    s.fpu.mxcsr = 0x1fa0;
    s.cr2 = 0x4242_0000;
    b.hw.set_state(s.clone()).unwrap();
    // Read back from KVM, not from the cache.
    b.hw.refresh();
    let back = b.hw.state();
    assert_eq!(back.gpr, s.gpr);
    assert_eq!(back.msr.lstar, s.msr.lstar);
    assert_eq!(back.msr.sysenter_eip, 0x1234);
    assert_eq!(back.fpu.xmm[7], s.fpu.xmm[7]);
    assert_eq!(back.cr2, 0x4242_0000);
    assert_eq!(back.seg, s.seg);
    assert_eq!(back.efer, s.efer);
}

/// The x87 and SSE state goes into KVM and comes back as it went in: an
/// engine switch or a snapshot carries it.
#[test]
fn fpu_state_round_trips_through_kvm() {
    if caps().is_none() {
        return;
    }
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let machine = Machine::new(MachineConfig::default(), ram, Box::new(std::io::sink())).unwrap();
    let mut hw = Hw::new(&machine).unwrap();
    let mut s = popek_cpu::CpuState::reset();
    s.fpu.fcw = 0x37f;
    s.fpu.fsw = 7 << 11; // TOP = 7: ST0 is R7
    s.fpu.ftw = 0x3fff; // R7 valid, the rest empty
    s.fpu.regs[7] = popek_cpu::state::F80 {
        mantissa: 0x8000_0000_0000_0000,
        sign_exp: 0x3fff,
    };
    s.fpu.xmm[1] = 0x1234;
    hw.set_state(s.clone()).unwrap();
    let back = hw.state();
    assert_eq!(back.fpu, s.fpu);
}
