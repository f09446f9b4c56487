//! The VM fuzzer: "a guest must never crash popek", and the software
//! engines are one CPU.
//!
//! Random guests — random bytes mixed with port I/O to every device and the
//! hypercall doorbell — run on the whole VM (machine, devices, VMM loop)
//! in every CPU mode popek's software CPU has: real mode, 16-bit protected
//! mode, 32-bit protected mode at ring 0 (unpaged and paged) and at ring 3.
//! A prologue built here puts the CPU in the mode (interrupts masked: the
//! timer would make runs depend on nothing but time) with descriptor
//! tables and IDT gates that lead back into the random code; then anything
//! goes. Each program runs under `--clock virtual` for a bounded number of
//! instructions on
//!
//! * `interp`, `bt` with code translated when hot (as shipped) and `bt`
//!   translating everything at once: their outcome, instruction count, CPU
//!   state and guest RAM must be identical;
//! * `trap` (protected modes): it must end in an ordinary outcome and keep
//!   its isolation (`Trap::isolation_check`: the monitor's tables intact,
//!   never real ring 0); where its audit shows no gap instruction that
//!   behaved differently, its outcome and registers must equal `interp`'s.
//!
//! A panic anywhere fails the test. `POPEK_VM_FUZZ_CASES` (programs per
//! mode, default 40) and `POPEK_VM_FUZZ_SEED` scale it; `POPEK_VM_FUZZ_ONLY`
//! replays one program; `POPEK_VM_FUZZ_INSNS` sets the instruction limit
//! (default 200,000). Long runs are documented in `docs/security.md`.

use std::io::Write;

use iced_x86::code_asm::*;
use popek_cpu::CpuState;
use popek_machine::ClockMode;
use popek_vmm::{EngineKind, FileFormat, KernelSource, Outcome, Vm, VmConfig};

/// Ports of the machine's devices, the POST port and the doorbell.
const PORTS: &[u16] = &[
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x60, 0x64, 0x3f8, 0x3f9,
    0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x600, 0x602, 0x604, 0x608, 0x4d0, 0x4d1, 0x80,
    0x5650,
];

/// Guest RAM of every run.
const RAM: u64 = 4 << 20;
/// Where protected-mode images load.
const LOAD: u64 = 0x10_0000;
/// The image layout (offsets from the load address): the prologue, the
/// random body, and the tables.
const BODY: u64 = 0x200;
const BODY_MAX: u64 = 0x1e00;
const GDT: u64 = 0x2000;
const IDT: u64 = 0x2800;
const TSS: u64 = 0x3000;
const PD: u64 = 0x4000;
const PT: u64 = 0x5000;
const IMAGE: u64 = 0x6000;

/// xorshift64*: the whole program follows from (seed, mode, index).
struct Rng(u64);

impl Rng {
    fn new(seed: u64, mode: Mode, i: u64) -> Rng {
        let mut r = Rng(seed
            ^ (mode as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ i.wrapping_mul(0xd1b5_4a32_d192_ed03)
            | 1);
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The CPU modes the prologue puts the guest in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Real,
    Prot16,
    Prot32,
    Paged32,
    Ring3,
}

const MODES: [Mode; 5] = [
    Mode::Real,
    Mode::Prot16,
    Mode::Prot32,
    Mode::Paged32,
    Mode::Ring3,
];

/// Random code: random bytes, with port accesses spliced in.
fn body(r: &mut Rng, bits32: bool) -> Vec<u8> {
    let mut code = Vec::new();
    let len = 16 + r.below(BODY_MAX - 16) as usize;
    // The operand-size prefix that reaches 16 bits in 32-bit code and the
    // other way round.
    let (p16, p32): (&[u8], &[u8]) = if bits32 {
        (&[0x66], &[])
    } else {
        (&[], &[0x66])
    };
    while code.len() < len {
        if r.below(4) == 0 {
            let port = PORTS[r.below(PORTS.len() as u64) as usize];
            code.extend_from_slice(p16);
            code.push(0xba); // mov dx, imm16
            code.extend_from_slice(&port.to_le_bytes());
            code.extend_from_slice(p32);
            code.push(0xb8); // mov eax, imm32
            code.extend_from_slice(&(r.next() as u32).to_le_bytes());
            let (size, out) = (r.below(3), r.below(2) == 0);
            match size {
                0 => {}
                1 => code.extend_from_slice(p16),
                _ => code.extend_from_slice(p32),
            }
            code.push(match (size, out) {
                (0, true) => 0xee,
                (0, false) => 0xec,
                (_, true) => 0xef,
                (_, false) => 0xed,
            });
        } else {
            for _ in 0..1 + r.below(24) {
                code.push(r.next() as u8);
            }
        }
    }
    code
}

fn gdt_entry(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((flags & 0xf) as u64) << 52)
        | (((base >> 24) as u64) << 56)
}

/// The program for `mode`: (image, format).
fn program(seed: u64, mode: Mode, i: u64) -> (Vec<u8>, FileFormat) {
    let mut r = Rng::new(seed, mode, i);
    if mode == Mode::Real {
        let mut code = vec![0xfa]; // cli
        code.extend(body(&mut r, false));
        return (code, FileFormat::FlatReal { load_addr: 0x7c00 });
    }
    let at = |off: u64| (LOAD + off) as i32;
    let mut a = CodeAssembler::new(32).unwrap();
    a.cli().unwrap();
    a.mov(esp, 0x30_0000).unwrap();
    a.lgdt(dword_ptr(at(GDT + 0x7f0))).unwrap();
    a.lidt(dword_ptr(at(GDT + 0x7f8))).unwrap();
    match mode {
        Mode::Prot16 => {
            // RETF to 0x18 (16-bit code, base LOAD), offset BODY; 16-bit
            // data segments.
            a.mov(ax, 0x20).unwrap();
            a.mov(ds, ax).unwrap();
            a.mov(es, ax).unwrap();
            a.mov(ss, ax).unwrap();
            a.mov(esp, 0xfff0).unwrap();
            a.push(0x18).unwrap();
            a.push(BODY as i32).unwrap();
            a.retf().unwrap();
        }
        Mode::Paged32 => {
            a.mov(eax, at(PD)).unwrap();
            a.mov(cr3, eax).unwrap();
            a.mov(eax, cr0).unwrap();
            a.or(eax, 0x8000_0000u32 as i32).unwrap();
            a.mov(cr0, eax).unwrap();
            a.mov(eax, at(BODY)).unwrap();
            a.jmp(eax).unwrap();
        }
        Mode::Ring3 => {
            a.mov(ax, 0x38).unwrap();
            a.ltr(ax).unwrap();
            a.push(0x33).unwrap(); // SS (ring 3 data)
            a.push(0x2f_0000).unwrap(); // ESP
            a.push(0x2).unwrap(); // EFLAGS: IF clear
            a.push(0x2b).unwrap(); // CS (ring 3 code)
            a.push(at(BODY)).unwrap();
            a.iretd().unwrap();
        }
        _ => {
            a.mov(eax, at(BODY)).unwrap();
            a.jmp(eax).unwrap();
        }
    }
    let mut img = a.assemble(LOAD).unwrap();
    assert!(img.len() as u64 <= BODY, "prologue too long");
    img.resize(IMAGE as usize, 0);
    let b = body(&mut r, mode != Mode::Prot16);
    img[BODY as usize..BODY as usize + b.len()].copy_from_slice(&b);
    let mut put = |off: u64, bytes: &[u8]| {
        img[off as usize..off as usize + bytes.len()].copy_from_slice(bytes)
    };
    // GDT: null, 0x08 flat code, 0x10 flat data, 0x18 16-bit code at
    // LOAD, 0x20 16-bit data at LOAD, 0x28 ring-3 code, 0x30 ring-3 data,
    // 0x38 TSS.
    let entries = [
        0,
        gdt_entry(0, 0xfffff, 0x9a, 0xc),
        gdt_entry(0, 0xfffff, 0x92, 0xc),
        gdt_entry(LOAD as u32, 0xffff, 0x9a, 0x0),
        gdt_entry(LOAD as u32, 0xffff, 0x92, 0x0),
        gdt_entry(0, 0xfffff, 0xfa, 0xc),
        gdt_entry(0, 0xfffff, 0xf2, 0xc),
        gdt_entry((LOAD + TSS) as u32, 0x67, 0x89, 0x0),
    ];
    for (k, e) in entries.iter().enumerate() {
        put(GDT + 8 * k as u64, &e.to_le_bytes());
    }
    put(GDT + 0x7f0, &((entries.len() * 8 - 1) as u16).to_le_bytes());
    put(GDT + 0x7f2, &((LOAD + GDT) as u32).to_le_bytes());
    // The IDT: none at all, or 32 gates into the random code (in 16-bit
    // protected mode, gates to the 16-bit code segment).
    let gates = r.below(3);
    let idt_limit = if gates == 0 { 0 } else { 32 * 8 - 1 };
    put(GDT + 0x7f8, &(idt_limit as u16).to_le_bytes());
    put(GDT + 0x7fa, &((LOAD + IDT) as u32).to_le_bytes());
    for v in 0..32u64 {
        let off = BODY + r.below(b.len() as u64);
        let (sel, target) = if mode == Mode::Prot16 {
            (0x18u64, off)
        } else {
            (0x08, LOAD + off)
        };
        let gate = (target & 0xffff) | (sel << 16) | (0x8e00u64 << 32) | ((target >> 16) << 48);
        put(IDT + v * 8, &gate.to_le_bytes());
    }
    // The TSS: the ring-0 stack for ring 3.
    put(TSS + 4, &0x2e_0000u32.to_le_bytes());
    put(TSS + 8, &0x10u32.to_le_bytes());
    put(TSS + 0x66, &0x68u16.to_le_bytes());
    // Identity paging of the first 4 MiB (user, writable).
    put(PD, &(((LOAD + PT) as u32) | 7).to_le_bytes());
    for p in 0..1024u64 {
        put(PT + 4 * p, &(((p << 12) as u32) | 7).to_le_bytes());
    }
    (img, FileFormat::FlatProtected { load_addr: LOAD })
}

/// What a run ended with: outcome, instruction count, state, RAM.
struct End {
    outcome: Option<Outcome>,
    icount: u64,
    state: CpuState,
    /// A hash of guest RAM.
    ram: u64,
    /// trap only: gap instructions that behaved differently.
    differed: u64,
    /// trap only: its traps by kind.
    traps: Vec<(String, u64)>,
}

/// The `bt` variants: translate code when hot (as shipped) or at once.
#[derive(Clone, Copy)]
enum Variant {
    Plain,
    BtHot,
}

fn run(
    engine: EngineKind,
    variant: Variant,
    image: &[u8],
    format: FileFormat,
    name: &str,
    insns: u64,
) -> End {
    let dir = std::env::temp_dir().join(format!("popek-vm-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(image))
        .unwrap();
    let cfg = VmConfig {
        memory: RAM,
        kernel: KernelSource::File {
            path: path.clone(),
            format: Some(format),
        },
        initrd: None,
        cmdline: String::new(),
        engine,
        clock: ClockMode::Virtual,
        vendor: None,
        cpus: 1,
        firmware: None,
        threads: popek_vmm::Threads::Auto,
        devices: Default::default(),
    };
    let mut vm = Vm::new(&cfg, Box::new(std::io::sink())).unwrap_or_else(|e| panic!("{name}: {e}"));
    let _ = std::fs::remove_file(&path);
    if let Variant::BtHot = variant {
        let bt = vm
            .engine
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<popek_bt::Bt>())
            .expect("the bt engine");
        bt.core().set_hot_after(1);
    }
    let outcome = vm.run_limited(insns);
    if let Some(o) = &outcome {
        let st = o.exit_status();
        assert!(
            st == 0 || st % 2 == 1 || [2, 4, 6].contains(&st),
            "{name} on {}: status {st} for {o:?}",
            engine.name()
        );
    }
    let mut differed = 0;
    let traps: Vec<(String, u64)> = vm.stats().into_iter().filter(|(_, v)| *v > 0).collect();
    if engine == EngineKind::Trap {
        let trap = vm
            .engine
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<popek_trap::Trap>())
            .expect("the trap engine");
        if let Err(e) = trap.isolation_check() {
            panic!("{name}: ESCAPE from trap: {e}");
        }
        differed = vm
            .engine
            .inspect()
            .and_then(|i| i.audit())
            .unwrap_or_default()
            .iter()
            .map(|r| r.differed)
            .sum::<u64>();
    }
    let mut ram = 0xcbf2_9ce4_8422_2325u64;
    let mut chunk = vec![0u8; 1 << 16];
    for at in (0..RAM).step_by(chunk.len()) {
        vm.machine.ram().read(at, &mut chunk).unwrap();
        for w in chunk.chunks_exact(8) {
            ram = (ram ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
        }
    }
    End {
        outcome,
        icount: vm.engine.instructions(),
        state: vm.engine.state(),
        ram,
        differed,
        traps,
    }
}

/// The outcome without the engine's name in its report.
fn kind(o: &Option<Outcome>) -> String {
    match o {
        None => "limit".into(),
        Some(o) => format!("status {}", o.exit_status()),
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            v.strip_prefix("0x")
                .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(default)
}

/// Runs the programs of `modes` on `engines`; returns how many ran.
fn fuzz(modes: &[Mode], with_trap: bool) -> u64 {
    let cases = env("POPEK_VM_FUZZ_CASES", 40);
    let seed = env("POPEK_VM_FUZZ_SEED", 0x706f_7065_6b66_757a);
    let insns = env("POPEK_VM_FUZZ_INSNS", 200_000);
    let only = std::env::var("POPEK_VM_FUZZ_ONLY").ok();
    let bt = EngineKind::Bt.available();
    let mut ran = 0;
    let mut trap_compared = 0;
    for &mode in modes {
        for i in 0..cases {
            let name = format!("{mode:?}-{i}");
            if only.as_ref().is_some_and(|o| *o != name) {
                continue;
            }
            if std::env::var_os("POPEK_VM_FUZZ_VERBOSE").is_some() {
                eprintln!("vm fuzz: {name}");
            }
            let (image, format) = program(seed, mode, i);
            if let Some(dir) = std::env::var_os("POPEK_VM_FUZZ_SAVE") {
                let _ = std::fs::write(
                    std::path::Path::new(&dir).join(format!("{name}.bin")),
                    &image,
                );
            }
            let reference = run(
                EngineKind::Interp,
                Variant::Plain,
                &image,
                format,
                &name,
                insns,
            );
            let mut others = Vec::new();
            if bt {
                others.push((
                    "bt",
                    run(EngineKind::Bt, Variant::Plain, &image, format, &name, insns),
                ));
                others.push((
                    "bt (translated at once)",
                    run(EngineKind::Bt, Variant::BtHot, &image, format, &name, insns),
                ));
            }
            // (Under trap, a guest that stops making progress — an
            // exception loop — is ended by the watchdog after a number of
            // deliveries that depends on the monitor's slices.)
            let stalled = |o: &Option<Outcome>| o.as_ref().is_some_and(|o| o.exit_status() == 6);
            for (what, e) in &others {
                let same = kind(&e.outcome) == kind(&reference.outcome)
                    && e.icount == reference.icount
                    && e.state == reference.state
                    && e.ram == reference.ram;
                assert!(
                    same,
                    "{name} (POPEK_VM_FUZZ_SEED={seed:#x} POPEK_VM_FUZZ_ONLY={name}): {what} \
                     and interp disagree\n  interp: {} after {} instructions, rip {:#x}, gpr \
                     {:x?}, flags {:#x}\n  {what}: {} after {} instructions, rip {:#x}, gpr \
                     {:x?}, flags {:#x}, RAM {}",
                    kind(&reference.outcome),
                    reference.icount,
                    reference.state.rip,
                    &reference.state.gpr[..8],
                    reference.state.rflags,
                    kind(&e.outcome),
                    e.icount,
                    e.state.rip,
                    &e.state.gpr[..8],
                    e.state.rflags,
                    if e.ram == reference.ram {
                        "equal"
                    } else {
                        "differs"
                    }
                );
            }
            if with_trap && mode != Mode::Real && EngineKind::Trap.available() {
                let t = run(
                    EngineKind::Trap,
                    Variant::Plain,
                    &image,
                    format,
                    &name,
                    insns,
                );
                // Comparable: no gap instruction differed, and no fault
                // was reflected that the monitor's share of the linear
                // space may have caused (an access through a segment cut
                // short below its 4 MiB: #GP or #SS where the CPU would
                // have gone on).
                // Nor did the guest store to its live page tables: when a
                // stale translation stops being used is up to the TLB (the
                // shadow drops it at once, interp's TLB keeps it until an
                // invalidation), and both are x86.
                let cut = t.traps.iter().any(|(k, _)| {
                    k.contains("#GP reflected")
                        || k.contains("#SS reflected")
                        || k.contains("monitor-area")
                        || k.contains("#PF write-protect")
                        || k.contains("#PF monitor area")
                        || k.contains("shadow entries dropped")
                }) || {
                    // A shadow rebuilt more often than CR3 was loaded: the
                    // guest wrote its page directory.
                    let stat = |name: &str| {
                        t.traps
                            .iter()
                            .find(|(k, _)| k.starts_with(name))
                            .map_or(0, |x| x.1)
                    };
                    stat("shadow syncs") > stat("CR3 switches") + 1
                };
                // (Status 2: trap found at run time that it cannot run
                // the guest, e.g. PAE.)
                let unsupported = t.outcome.as_ref().is_some_and(|o| o.exit_status() == 2);
                if t.differed == 0
                    && !cut
                    && !unsupported
                    && t.outcome.is_some()
                    && reference.outcome.is_some()
                {
                    trap_compared += 1;
                    assert_eq!(
                        kind(&t.outcome),
                        kind(&reference.outcome),
                        "{name}: trap and interp end differently"
                    );
                    // A guest that stopped making progress (an exception
                    // loop) is stopped by the watchdog after a number of
                    // deliveries that depends on the engine's slices.
                    assert!(
                        stalled(&t.outcome)
                            || (t.state.gpr[..8] == reference.state.gpr[..8]
                                && t.icount == reference.icount),
                        "{name}: trap and interp registers or instruction counts: {:x?} vs {:x?}; trap rip {:#x} \
                         icount {}, interp rip {:#x} icount {}; trap's traps {:?}",
                        &t.state.gpr[..8],
                        &reference.state.gpr[..8],
                        t.state.rip,
                        t.icount,
                        reference.state.rip,
                        reference.icount,
                        t.traps
                    );
                }
            }
            ran += 1;
            if ran % 1000 == 0 {
                eprintln!("vm fuzz: {ran} programs ({mode:?} up to {i}), trap compared on {trap_compared}");
            }
        }
    }
    eprintln!(
        "vm fuzz: {ran} programs ({modes:?}, {insns} instructions at most) on interp{}{}; \
         trap compared on {trap_compared} whose audit showed no difference",
        if bt {
            ", bt, bt translating at once"
        } else {
            ""
        },
        if with_trap { ", trap" } else { "" }
    );
    ran
}

#[test]
fn random_programs_in_real_and_16_bit_mode() {
    assert!(fuzz(&[Mode::Real, Mode::Prot16], true) > 0);
}

#[test]
fn random_programs_in_32_bit_mode() {
    assert!(fuzz(&[Mode::Prot32, Mode::Paged32], true) > 0);
}

#[test]
fn random_programs_at_ring_3() {
    assert!(fuzz(&[Mode::Ring3], true) > 0);
}

#[test]
fn every_mode_is_generated() {
    for m in MODES {
        let (img, _) = program(1, m, 0);
        assert!(img.len() > 16, "{m:?}");
    }
}
