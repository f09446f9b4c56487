//! The local APIC and the I/O APIC seen by a guest, on every engine that
//! runs flat protected mode: a test program (assembled here with iced-x86)
//! programs the APIC timer in its three modes, holds a self-IPI back with
//! the task priority, routes the PIT through the I/O APIC, switches to
//! x2APIC mode and back (where CPUID offers it), takes NMIs (blocked until
//! IRET), and reports the first stage that went wrong through the
//! debug-exit port. A second
//! program starts an application processor with INIT and SIPI and has both
//! vCPUs count on a shared word with locked instructions and send each
//! other IPIs, and two litmus tests hold x86's memory order between them:
//! message passing (stores and loads stay in order) and store buffering
//! with fences (MFENCE, a LOCKed instruction: never both loads before the
//! other's store) — by construction while the vCPUs take turns on one host
//! thread, and for real with a host thread each (`--threads multi`).

use iced_x86::code_asm::{dword_ptr, eax, ecx, edx, esp, ptr, CodeAssembler, IcedError};

mod support;
use support::*;

const LOAD: u64 = 0x10000;
const HANDLERS: u64 = 0x14000;
const IDT: u64 = 0x15000;
const IDTR: u64 = 0x15800;
const IMAGE: usize = 0x6000;
/// Interrupt counters, one dword per vector.
const COUNTS: u32 = 0x20000;
const APIC: u32 = 0xfee0_0000;
const IOAPIC: u32 = 0xfec0_0000;
/// The debug-exit value of a program that passed every stage.
const PASSED: u8 = 0x21;
/// The debug-exit value of an unexpected interrupt or exception.
const UNEXPECTED: u8 = 0x7f;

/// Vectors with a counting handler: the I/O APIC's PIT, the timer, the
/// self-IPI, the TSC-deadline timer.
/// (and the IPI of the two-vCPU program).
const COUNTED: [u8; 5] = [0x30, 0x40, 0x41, 0x42, 0x50];

type Asm = CodeAssembler;

fn count(v: u8) -> u32 {
    COUNTS + 4 * u32::from(v)
}

fn exit(a: &mut Asm, v: u8) -> Result<(), IcedError> {
    a.mov(eax, u32::from(v))?;
    a.out(0xf4, iced_x86::code_asm::al)?;
    a.hlt()
}

fn apic_write(a: &mut Asm, reg: u32, v: u32) -> Result<(), IcedError> {
    a.mov(dword_ptr(APIC + reg), v)
}

/// Fails with `code` unless EAX == `want`.
fn expect_eax(a: &mut Asm, want: u32, code: u8) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.cmp(eax, want)?;
    a.je(ok)?;
    exit(a, code)?;
    a.set_label(&mut ok)
}

/// Halts with interrupts on until vector `v` has come `n` times (at most
/// 1000 wake-ups), else fails with `code`.
fn wait_for(a: &mut Asm, v: u8, n: u32, code: u8) -> Result<(), IcedError> {
    let mut again = a.create_label();
    let mut done = a.create_label();
    a.mov(ecx, 1000u32)?;
    a.set_label(&mut again)?;
    a.cmp(dword_ptr(count(v)), n)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.dec(ecx)?;
    a.jnz(again)?;
    exit(a, code)?;
    a.set_label(&mut done)
}

fn main_program(a: &mut Asm) -> Result<(), IcedError> {
    program_body(a, true)
}

/// The stages; `nmi`: with stage 8, the NMIs (`trap` delivers none: its
/// guest's IRET runs unseen, so NMI blocking could never end).
fn program_body(a: &mut Asm, nmi: bool) -> Result<(), IcedError> {
    a.mov(esp, 0x40000u32)?;
    a.lidt(ptr(IDTR as u32))?;
    // The 8259s stay out of it.
    a.mov(eax, 0xffu32)?;
    a.out(0x21, iced_x86::code_asm::al)?;
    a.out(0xa1, iced_x86::code_asm::al)?;

    // 1: identity. CPUID says there is an APIC, IA32_APIC_BASE is the
    // BSP's at the default page, the version register is the model's.
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.mov(eax, edx)?;
    a.and(eax, 1u32 << 9)?;
    expect_eax(a, 1 << 9, 1)?;
    a.mov(ecx, 0x1bu32)?;
    a.rdmsr()?;
    a.and(eax, 0xffff_f900u32)?;
    expect_eax(a, 0xfee0_0900, 1)?;
    a.mov(eax, dword_ptr(APIC + 0x30))?;
    a.and(eax, 0xff00ffu32)?;
    expect_eax(a, 0x05_0014, 1)?;

    // 2: software enable, one-shot timer, ÷1, 100 µs: one interrupt, and
    // the count is 0 afterwards.
    apic_write(a, 0xf0, 0x1ff)?;
    apic_write(a, 0x350, 0x1_0700)?;
    apic_write(a, 0x3e0, 0xb)?;
    apic_write(a, 0x320, 0x40)?;
    apic_write(a, 0x380, 100_000)?;
    wait_for(a, 0x40, 1, 2)?;
    a.mov(eax, dword_ptr(APIC + 0x390))?;
    expect_eax(a, 0, 2)?;

    // 3: periodic, 50 µs: it keeps coming.
    apic_write(a, 0x320, 0x2_0040)?;
    apic_write(a, 0x380, 50_000)?;
    wait_for(a, 0x40, 5, 3)?;
    apic_write(a, 0x320, 0x1_0040)?;

    // 4: TPR 0x50 holds a self-IPI of class 4 in IRR; TPR 0 lets it in.
    apic_write(a, 0x80, 0x50)?;
    apic_write(a, 0x300, 0x4_4041)?;
    a.sti()?;
    for _ in 0..20 {
        a.nop()?;
    }
    a.cli()?;
    a.mov(eax, dword_ptr(count(0x41)))?;
    expect_eax(a, 0, 4)?;
    a.mov(eax, dword_ptr(APIC + 0x220))?;
    expect_eax(a, 1 << 1, 4)?;
    a.mov(eax, dword_ptr(APIC + 0xa0))?;
    expect_eax(a, 0x50, 4)?;
    apic_write(a, 0x80, 0)?;
    wait_for(a, 0x41, 1, 5)?;

    // 6: TSC-deadline mode, where CPUID offers it: fires once, and the
    // MSR reads 0 afterwards.
    let mut no_deadline = a.create_label();
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.test(ecx, 1u32 << 24)?;
    a.jz(no_deadline)?;
    apic_write(a, 0x320, 0x4_0042)?;
    a.rdtsc()?;
    a.add(eax, 200_000u32)?;
    a.adc(edx, 0u32)?;
    a.mov(ecx, 0x6e0u32)?;
    a.wrmsr()?;
    wait_for(a, 0x42, 1, 6)?;
    a.mov(ecx, 0x6e0u32)?;
    a.rdmsr()?;
    expect_eax(a, 0, 6)?;
    apic_write(a, 0x320, 0x1_0040)?;
    a.set_label(&mut no_deadline)?;

    // 7: the PIT through I/O APIC pin 2 (ISA IRQ 0's override) to vector
    // 0x30, edge-triggered, physical destination APIC 0.
    a.mov(dword_ptr(IOAPIC), 0x14u32)?;
    a.mov(dword_ptr(IOAPIC + 0x10), 0x30u32)?;
    a.mov(dword_ptr(IOAPIC), 0x15u32)?;
    a.mov(dword_ptr(IOAPIC + 0x10), 0u32)?;
    a.mov(eax, 0x34u32)?;
    a.out(0x43, iced_x86::code_asm::al)?;
    a.mov(eax, 1193u32)?; // 1 kHz
    a.out(0x40, iced_x86::code_asm::al)?;
    a.mov(eax, 1193u32 >> 8)?;
    a.out(0x40, iced_x86::code_asm::al)?;
    wait_for(a, 0x30, 3, 7)?;

    // 8: x2APIC mode, where CPUID offers it: the registers are MSRs, the
    // page is gone, a self-IPI through SELF IPI (0x83F) comes and its EOI
    // (0x80B) retires it.
    let mut no_x2apic = a.create_label();
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.test(ecx, 1u32 << 21)?;
    a.jz(no_x2apic)?;
    a.mov(ecx, 0x1bu32)?;
    a.rdmsr()?;
    a.or(eax, 1u32 << 10)?;
    a.wrmsr()?;
    a.mov(ecx, 0x802u32)?; // ID: 32 bits, the vCPU's index
    a.rdmsr()?;
    expect_eax(a, 0, 8)?;
    a.mov(ecx, 0x803u32)?; // version
    a.rdmsr()?;
    a.and(eax, 0xffu32)?;
    expect_eax(a, 0x14, 8)?;
    a.mov(eax, dword_ptr(APIC + 0x30))?; // the xAPIC page reads nothing
    expect_eax(a, 0xffff_ffff, 8)?;
    a.mov(ecx, 0x83fu32)?;
    a.mov(eax, 0x43u32)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    wait_for(a, 0x43, 1, 8)?;
    a.mov(ecx, 0x812u32)?; // ISR, vectors 0x40–0x5F: retired
    a.rdmsr()?;
    expect_eax(a, 0, 8)?;
    // Back to xAPIC mode: only through disabled (a direct switch is #GP).
    a.mov(ecx, 0x1bu32)?;
    a.rdmsr()?;
    a.and(eax, !((1u32 << 10) | (1 << 11)))?;
    a.wrmsr()?;
    a.or(eax, 1u32 << 11)?;
    a.wrmsr()?;
    apic_write(a, 0xf0, 0x1ff)?;
    a.set_label(&mut no_x2apic)?;
    a.nop()?;

    if !nmi {
        return exit(a, PASSED);
    }
    // 9: an NMI to its own APIC ID, with interrupts off: taken at once;
    // the one its handler sends waits for the IRET, then comes.
    a.cli()?;
    apic_write(a, 0x310, 0)?;
    apic_write(a, 0x300, 0x4400)?;
    spin_until(a, count(2), 2, 9)?;

    exit(a, PASSED)
}

/// The NMI handler: counts; the first one sends itself a second NMI,
/// which must wait for this handler's IRET.
fn nmi_handler(a: &mut Asm) -> Result<(), IcedError> {
    let mut done = a.create_label();
    a.inc(dword_ptr(count(2)))?;
    a.cmp(dword_ptr(count(2)), 1u32)?;
    a.jne(done)?;
    apic_write(a, 0x310, 0)?;
    apic_write(a, 0x300, 0x4400)?;
    for _ in 0..10 {
        a.nop()?;
    }
    a.mov(eax, dword_ptr(count(2)))?;
    expect_eax(a, 1, 0x28)?;
    a.nop()?;
    a.set_label(&mut done)?;
    a.iretd()
}

/// The x2APIC self-IPI's handler: counts, and signals EOI through the
/// MSR.
fn x2apic_handler(a: &mut Asm) -> Result<(), IcedError> {
    a.push(eax)?;
    a.push(ecx)?;
    a.push(edx)?;
    a.inc(dword_ptr(count(0x43)))?;
    a.mov(ecx, 0x80bu32)?;
    a.xor(eax, eax)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.pop(edx)?;
    a.pop(ecx)?;
    a.pop(eax)?;
    a.iretd()
}

/// A handler that counts its vector and signals EOI.
fn counting_handler(a: &mut Asm, v: u8) -> Result<(), IcedError> {
    a.inc(dword_ptr(count(v)))?;
    a.mov(dword_ptr(APIC + 0xb0), 0u32)?;
    a.iretd()
}

fn assemble(ip: u64, f: &dyn Fn(&mut Asm) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

fn program() -> Vec<u8> {
    image(&main_program)
}

fn image(main: &dyn Fn(&mut Asm) -> Result<(), IcedError>) -> Vec<u8> {
    let mut img = vec![0u8; IMAGE];
    let code = assemble(LOAD, main);
    assert!(code.len() < (HANDLERS - LOAD) as usize);
    img[..code.len()].copy_from_slice(&code);
    let put = |img: &mut Vec<u8>, at: u64, b: &[u8]| {
        let o = (at - LOAD) as usize;
        img[o..o + b.len()].copy_from_slice(b);
    };
    // Slot 0: the handler of everything unexpected; then one per counted
    // vector.
    let slot = |i: usize| HANDLERS + 0x80 * i as u64;
    put(
        &mut img,
        slot(0),
        &assemble(slot(0), &|a| exit(a, UNEXPECTED)),
    );
    for (i, &v) in COUNTED.iter().enumerate() {
        put(
            &mut img,
            slot(i + 1),
            &assemble(slot(i + 1), &|a| counting_handler(a, v)),
        );
    }
    let nmi = slot(COUNTED.len() + 1);
    put(&mut img, nmi, &assemble(nmi, &nmi_handler));
    let x2 = slot(COUNTED.len() + 2);
    put(&mut img, x2, &assemble(x2, &x2apic_handler));
    for v in 0..256usize {
        let h = COUNTED
            .iter()
            .position(|&c| usize::from(c) == v)
            .map_or(slot(0), |i| slot(i + 1)) as u32;
        let h = match v {
            2 => nmi as u32,
            0x43 => x2 as u32,
            _ => h,
        };
        // 32-bit interrupt gate, DPL 0, the flat loader's code selector.
        let gate =
            u64::from(h & 0xffff) | (0x10 << 16) | (0x8e00u64 << 32) | (u64::from(h >> 16) << 48);
        put(&mut img, IDT + 8 * v as u64, &gate.to_le_bytes());
    }
    let mut idtr = vec![0xff, 0x07];
    idtr.extend_from_slice(&(IDT as u32).to_le_bytes());
    put(&mut img, IDTR, &idtr);
    img
}

fn run(engine: &str, extra: &[&str]) -> Run {
    run_image("apic", engine, &program(), extra)
}

fn run_image(name: &str, engine: &str, img: &[u8], extra: &[&str]) -> Run {
    let mut args = vec!["--engine", engine, "--memory", "4M"];
    args.extend_from_slice(extra);
    let clock = extra
        .iter()
        .position(|&a| a == "--clock")
        .map_or("", |i| extra[i + 1]);
    run_flat(
        &format!("{name}-{engine}{clock}.bin"),
        img,
        "flat-protected",
        LOAD,
        &args,
    )
}

fn assert_passed(engine: &str, r: &Run) {
    let stage = (r.status - 1) / 2;
    assert_eq!(
        r.status,
        (i32::from(PASSED) << 1) | 1,
        "{engine}: stage {stage:#x} failed (0x7f: an unexpected interrupt)\n{}",
        r.stderr
    );
}

#[test]
fn apic_timer_priority_and_ioapic_on_the_software_engines() {
    for engine in ["interp", "bt"] {
        for clock in ["virtual", "host"] {
            let r = run(engine, &["--clock", clock]);
            assert_passed(engine, &r);
        }
    }
}

#[test]
fn apic_on_trap() {
    let img = image(&|a| program_body(a, false));
    let r = run_image("apic-no-nmi", "trap", &img, &["--clock", "virtual"]);
    assert_passed("trap", &r);
}

/// On `hw` the APIC is the machine's too, reached through MMIO exits and
/// interrupt injection. A software KVM (kvm_pvm) fails to emulate the
/// handlers' IRETD at CPL 0: the VM then goes on under `bt` for a slice
/// and comes back (the snapshot issue's fallback), so the run passes
/// either way and the first stages ran under KVM.
#[test]
fn apic_on_hw() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let r = run("hw", &["--fallback-engine", "bt", "--stats"]);
    assert_passed("hw", &r);
    assert!(r.stderr.contains("0x40: 5"), "{}", r.stderr);
}

/// The two-vCPU program's layout: the AP's 32-bit code, its real-mode
/// start-up code (assembled for 0x7000, copied there by the BSP), a GDT
/// with the flat loader's selectors, and the shared words.
const AP_CODE: u64 = 0x13000;
const TRAMPOLINE_IMAGE: u64 = 0x13800;
const TRAMPOLINE: u64 = 0x7000;
const GDT: u64 = 0x15900;
const GDTR: u64 = 0x15920;
const ALIVE: u32 = 0x21000;
const SUM: u32 = 0x21004;
const AP_DONE: u32 = 0x21008;
const AP_ID: u32 = 0x2100c;
/// Message passing: the BSP writes DATA then FLAG, the AP reads FLAG then
/// DATA; a FLAG newer than DATA would break x86's ordering (TSO).
const DATA: u32 = 0x21040;
const FLAG: u32 = 0x21080;
const MP_VIOLATIONS: u32 = 0x21010;
const MP_DONE: u32 = 0x21014;
/// Messages the BSP sends.
const MESSAGES: u32 = 100_000;
/// Store buffering with fences: in round i the BSP writes i to SB_X,
/// MFENCE, reads SB_Y into SB_R1[i]; the AP writes i to SB_Y, a LOCKed
/// no-op on its stack, reads SB_X into SB_R2[i]. Both reading an older
/// round (the outcome fences forbid) is a violation.
const SB_X: u32 = 0x21100;
const SB_Y: u32 = 0x21140;
const SB_R1: u32 = 0x10_0000;
const SB_R2: u32 = 0x14_0000;
const SB_DONE: u32 = 0x21018;
/// Store-buffering rounds.
const SB_ROUNDS: u32 = 20_000;
/// Locked increments per vCPU.
const INCREMENTS: u32 = 200_000;

/// Spins (PAUSE) until the dword at `addr` is `want`, at most 20 million
/// times, else fails with `code`.
fn spin_until(a: &mut Asm, addr: u32, want: u32, code: u8) -> Result<(), IcedError> {
    let mut again = a.create_label();
    let mut done = a.create_label();
    a.mov(ecx, 20_000_000u32)?;
    a.set_label(&mut again)?;
    a.cmp(dword_ptr(addr), want)?;
    a.je(done)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(again)?;
    exit(a, code)?;
    a.set_label(&mut done)
}

fn locked_increments(a: &mut Asm) -> Result<(), IcedError> {
    let mut again = a.create_label();
    a.mov(ecx, INCREMENTS)?;
    a.set_label(&mut again)?;
    a.lock().inc(dword_ptr(SUM))?;
    a.dec(ecx)?;
    a.jnz(again)
}

/// One side of the store-buffering test: round i writes i to `mine`,
/// fences (MFENCE, or a LOCKed OR on the stack), reads `theirs` into
/// `seen[i]`.
fn store_buffering(
    a: &mut Asm,
    mine: u32,
    theirs: u32,
    seen: u32,
    locked: bool,
) -> Result<(), IcedError> {
    let mut round = a.create_label();
    let mut wait = a.create_label();
    let mut go = a.create_label();
    // The round counters sit beside the words (a barrier per round, so
    // that both vCPUs run round i at once).
    a.mov(ecx, 1u32)?;
    a.set_label(&mut round)?;
    a.mov(dword_ptr(mine + 0x400), ecx)?;
    a.set_label(&mut wait)?;
    a.cmp(dword_ptr(theirs + 0x400), ecx)?;
    a.jae(go)?;
    a.pause()?;
    a.jmp(wait)?;
    a.set_label(&mut go)?;
    a.mov(dword_ptr(mine), ecx)?;
    if locked {
        a.lock().or(dword_ptr(esp), 0)?;
    } else {
        a.mfence()?;
    }
    a.mov(eax, dword_ptr(theirs))?;
    a.mov(dword_ptr(ecx * 4 + seen), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, SB_ROUNDS)?;
    a.jbe(round)
}

fn bsp_program(a: &mut Asm) -> Result<(), IcedError> {
    a.mov(esp, 0x40000u32)?;
    a.lgdt(ptr(GDTR as u32))?;
    a.lidt(ptr(IDTR as u32))?;
    a.mov(eax, 0xffu32)?;
    a.out(0x21, iced_x86::code_asm::al)?;
    a.out(0xa1, iced_x86::code_asm::al)?;
    // The AP's start-up code to 0x7000.
    a.cld()?;
    a.mov(iced_x86::code_asm::esi, TRAMPOLINE_IMAGE as u32)?;
    a.mov(iced_x86::code_asm::edi, TRAMPOLINE as u32)?;
    a.mov(ecx, 0x100u32)?;
    a.rep().movsb()?;
    apic_write(a, 0xf0, 0x1ff)?;
    // INIT, then a start-up IPI with vector 0x07, to APIC ID 1.
    apic_write(a, 0x310, 1 << 24)?;
    apic_write(a, 0x300, 0x4500)?;
    apic_write(a, 0x300, 0x8500)?; // INIT level de-assert
    apic_write(a, 0x310, 1 << 24)?;
    apic_write(a, 0x300, 0x4600 | (TRAMPOLINE >> 12) as u32)?;
    spin_until(a, ALIVE, 1, 0x11)?;
    a.mov(eax, dword_ptr(AP_ID))?;
    expect_eax(a, 1, 0x12)?;
    locked_increments(a)?;
    spin_until(a, AP_DONE, 1, 0x13)?;
    a.mov(eax, dword_ptr(SUM))?;
    expect_eax(a, 2 * INCREMENTS, 0x14)?;
    // Message passing: DATA, then FLAG, MESSAGES times.
    let mut send = a.create_label();
    a.mov(ecx, 1u32)?;
    a.set_label(&mut send)?;
    a.mov(dword_ptr(DATA), ecx)?;
    a.mov(dword_ptr(FLAG), ecx)?;
    a.inc(ecx)?;
    a.cmp(ecx, MESSAGES)?;
    a.jbe(send)?;
    spin_until(a, MP_DONE, 1, 0x19)?;
    a.mov(eax, dword_ptr(MP_VIOLATIONS))?;
    expect_eax(a, 0, 0x1a)?;
    store_buffering(a, SB_X, SB_Y, SB_R1, false)?;
    spin_until(a, SB_DONE, 1, 0x1b)?;
    // Rounds where neither saw the other's store.
    let mut check = a.create_label();
    let mut seen = a.create_label();
    a.xor(edx, edx)?;
    a.mov(ecx, 1u32)?;
    a.set_label(&mut check)?;
    a.cmp(dword_ptr(ecx * 4 + SB_R1), ecx)?;
    a.jae(seen)?;
    a.cmp(dword_ptr(ecx * 4 + SB_R2), ecx)?;
    a.jae(seen)?;
    a.inc(edx)?;
    a.set_label(&mut seen)?;
    a.inc(ecx)?;
    a.cmp(ecx, SB_ROUNDS)?;
    a.jbe(check)?;
    a.mov(eax, edx)?;
    expect_eax(a, 0, 0x1c)?;
    // A fixed IPI to the AP, then one to all but self.
    apic_write(a, 0x310, 1 << 24)?;
    apic_write(a, 0x300, 0x4050)?;
    spin_until(a, count(0x50), 1, 0x15)?;
    apic_write(a, 0x300, 0xc_4050)?;
    spin_until(a, count(0x50), 2, 0x16)?;
    // The BSP's own APIC ID is 0.
    a.mov(eax, dword_ptr(APIC + 0x20))?;
    expect_eax(a, 0, 0x17)?;
    exit(a, PASSED)
}

fn ap_program(a: &mut Asm) -> Result<(), IcedError> {
    a.mov(eax, 0x18u32)?;
    a.mov(iced_x86::code_asm::ds, iced_x86::code_asm::ax)?;
    a.mov(iced_x86::code_asm::es, iced_x86::code_asm::ax)?;
    a.mov(iced_x86::code_asm::ss, iced_x86::code_asm::ax)?;
    a.mov(esp, 0x38000u32)?;
    a.lidt(ptr(IDTR as u32))?;
    apic_write(a, 0xf0, 0x1ff)?;
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.shr(iced_x86::code_asm::ebx, 24)?;
    a.mov(dword_ptr(AP_ID), iced_x86::code_asm::ebx)?;
    // The APIC's ID register agrees.
    a.mov(eax, dword_ptr(APIC + 0x20))?;
    expect_eax(a, 1 << 24, 0x18)?;
    a.lock().inc(dword_ptr(ALIVE))?;
    locked_increments(a)?;
    a.lock().inc(dword_ptr(AP_DONE))?;
    // Message passing, the reading side: FLAG, then DATA, until the last.
    let mut read = a.create_label();
    let mut ordered = a.create_label();
    a.set_label(&mut read)?;
    a.mov(eax, dword_ptr(FLAG))?;
    a.mov(edx, dword_ptr(DATA))?;
    a.cmp(edx, eax)?;
    a.jae(ordered)?;
    a.lock().inc(dword_ptr(MP_VIOLATIONS))?;
    a.set_label(&mut ordered)?;
    a.cmp(eax, MESSAGES)?;
    a.jne(read)?;
    a.lock().inc(dword_ptr(MP_DONE))?;
    store_buffering(a, SB_Y, SB_X, SB_R2, true)?;
    a.lock().inc(dword_ptr(SB_DONE))?;
    let mut idle = a.create_label();
    a.set_label(&mut idle)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(idle)
}

fn smp_image() -> Vec<u8> {
    let mut img = image(&bsp_program);
    let put = |img: &mut Vec<u8>, at: u64, b: &[u8]| {
        let o = (at - LOAD) as usize;
        img[o..o + b.len()].copy_from_slice(b);
    };
    put(&mut img, AP_CODE, &assemble(AP_CODE, &ap_program));
    // Real mode at 0700:0000: load the GDT (DS = 0x1000 reaches it), set
    // PE, jump to the AP's code through the flat code selector.
    let mut t = CodeAssembler::new(16).unwrap();
    t.cli().unwrap();
    t.mov(iced_x86::code_asm::ax, 0x1000u32).unwrap();
    t.mov(iced_x86::code_asm::ds, iced_x86::code_asm::ax)
        .unwrap();
    t.lgdt(ptr((GDTR - 0x10000) as u32)).unwrap();
    t.mov(eax, iced_x86::code_asm::cr0).unwrap();
    t.or(eax, 1u32).unwrap();
    t.mov(iced_x86::code_asm::cr0, eax).unwrap();
    let mut far = vec![0x66, 0xea];
    far.extend_from_slice(&(AP_CODE as u32).to_le_bytes());
    far.extend_from_slice(&0x10u16.to_le_bytes());
    t.db(&far).unwrap();
    put(&mut img, TRAMPOLINE_IMAGE, &t.assemble(TRAMPOLINE).unwrap());
    // The flat loader's selectors: code 0x10, data 0x18.
    let mut gdt = Vec::new();
    for d in [0u64, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff] {
        gdt.extend_from_slice(&d.to_le_bytes());
    }
    put(&mut img, GDT, &gdt);
    let mut gdtr = vec![0x1f, 0];
    gdtr.extend_from_slice(&(GDT as u32).to_le_bytes());
    put(&mut img, GDTR, &gdtr);
    img
}

#[test]
fn two_vcpus_start_count_together_and_send_ipis() {
    for engine in ["interp", "bt"] {
        for (clock, threads) in [("virtual", "single"), ("host", "single"), ("host", "multi")] {
            let r = run_image(
                "smp",
                engine,
                &smp_image(),
                &[
                    "--cpus",
                    "2",
                    "--clock",
                    clock,
                    "--threads",
                    threads,
                    "--stats",
                ],
            );
            assert_passed(engine, &r);
            if threads == "multi" {
                // Each vCPU ran on its own thread and says how much.
                let ran = |cpu: u32| -> u64 {
                    let key = format!("instructions on vCPU {cpu}");
                    let line = r.stderr.lines().find(|l| l.trim_start().starts_with(&key));
                    let n = line.and_then(|l| l.split_whitespace().last()?.parse().ok());
                    n.unwrap_or_else(|| panic!("no '{key}' in --stats:\n{}", r.stderr))
                };
                // (How the work splits depends on the host's scheduling:
                // a loaded host gave vCPU 1 0.98 million once.)
                assert!(ran(0) > 100_000 && ran(1) > 100_000, "{}", r.stderr);
            }
            // Both IPIs were taken by vCPU 1; its APIC is listed.
            assert!(
                r.stderr.contains("on vCPU 1                  0x50: 2"),
                "{}",
                r.stderr
            );
            assert!(
                r.stderr
                    .contains("local apic of vCPU 1 (ID 1, xAPIC, enabled) 0xfee00000+0x1000"),
                "{}",
                r.stderr
            );
        }
    }
}

/// hw: a KVM vCPU per guest vCPU, each on its own host thread (with `bt`
/// for what a software KVM's emulator cannot do, as on one vCPU).
#[test]
fn two_vcpus_on_hw() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let r = run_image(
        "smp",
        "hw",
        &smp_image(),
        &["--cpus", "2", "--fallback-engine", "bt", "--stats"],
    );
    assert_passed("hw", &r);
    let r = run_image(
        "smp",
        "hw",
        &smp_image(),
        &["--cpus", "2", "--threads", "single"],
    );
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(r.stderr.contains("a KVM vCPU each"), "{}", r.stderr);
}

#[test]
fn engines_that_run_one_vcpu_refuse_more() {
    let r = run_image("smp-refused", "trap", &smp_image(), &["--cpus", "2"]);
    assert_eq!(r.status, 2, "trap: {}", r.stderr);
    assert!(r.stderr.contains("more than one vCPU"), "{}", r.stderr);
    let r = run_image(
        "smp-virtual-multi",
        "bt",
        &smp_image(),
        &["--cpus", "2", "--clock", "virtual", "--threads", "multi"],
    );
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(r.stderr.contains("needs the host clock"), "{}", r.stderr);
    let r = run_image("smp-33", "bt", &smp_image(), &["--cpus", "33"]);
    assert_eq!(r.status, 2);
    assert!(
        r.stderr.contains("--cpus 33: must be between 1 and 32"),
        "{}",
        r.stderr
    );
}

/// A two-vCPU VM snapshotted while the AP starts up, while both count and
/// while they send IPIs goes on after a restore, on either software engine:
/// both vCPUs, their local APICs and the I/O APIC are in the snapshot.
/// Under the virtual clock they take turns on one thread; under the host
/// clock each has its own (the snapshot is taken between phases).
#[test]
fn a_two_vcpu_vm_snapshotted_mid_run_goes_on_after_a_restore() {
    for clock in [
        popek_machine::ClockMode::Virtual,
        popek_machine::ClockMode::Host,
    ] {
        two_vcpus_snapshotted(clock);
    }
}

fn two_vcpus_snapshotted(clock: popek_machine::ClockMode) {
    use popek_vmm::snapshot::SnapshotKind;
    use popek_vmm::{EngineKind, FileFormat, KernelSource, Outcome, RestoreOptions, Vm, VmConfig};
    let img = temp_file("smp-snap.bin", &smp_image());
    let cfg = VmConfig {
        memory: 4 << 20,
        kernel: KernelSource::File {
            path: img,
            format: Some(FileFormat::FlatProtected { load_addr: LOAD }),
        },
        initrd: None,
        cmdline: String::new(),
        engine: EngineKind::Bt,
        clock,
        vendor: None,
        cpus: 2,
        firmware: None,
        threads: popek_vmm::Threads::Auto,
        devices: Default::default(),
    };
    let mut vm = Vm::new(&cfg, Box::new(std::io::sink())).unwrap();
    assert_eq!(vm.run(), Outcome::DebugExit(PASSED));
    let total = vm.engine.instructions();
    let d = std::env::temp_dir().join(format!("popek-smp-snap-{}-{clock:?}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for (i, at) in [total / 50, total / 3, total * 9 / 10]
        .into_iter()
        .enumerate()
    {
        let mut at = at;
        let mut vm = Vm::new(&cfg, Box::new(std::io::sink())).unwrap();
        while let Some(o) = vm.run_limited(at) {
            // With a thread each, how long the vCPUs spin for each other
            // differs from run to run: this run may end sooner.
            assert_eq!(
                clock,
                popek_machine::ClockMode::Host,
                "still running at {at}"
            );
            assert_eq!(o, Outcome::DebugExit(PASSED));
            at /= 2;
            vm = Vm::new(&cfg, Box::new(std::io::sink())).unwrap();
        }
        let states = vm.vcpu_states();
        assert_eq!(states.len(), 2);
        let path = d.join(format!("smp-{i}.snap"));
        vm.snapshot(&path, None, SnapshotKind::Full).unwrap();
        drop(vm);
        let then = [EngineKind::Interp, EngineKind::Bt][i % 2];
        let opts = RestoreOptions {
            engine: Some(then),
            clone: false,
        };
        let mut vm = Vm::restore(&path, &opts, Box::new(std::io::sink())).unwrap();
        assert_eq!(vm.cpus(), 2);
        assert_eq!(vm.vcpu_states(), states, "both vCPUs come back");
        assert_eq!(
            vm.run(),
            Outcome::DebugExit(PASSED),
            "snapshot at {at} of {total}, restored on {}",
            then.name()
        );
    }
    std::fs::remove_dir_all(d).unwrap();
}
